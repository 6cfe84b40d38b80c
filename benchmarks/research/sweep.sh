#!/bin/bash
# sweep.sh tag 'cfg' attacks seeds  -> runs 2 in parallel
tag=$1; cfg=$2; attacks=${3:-badnets,badnets_solid,blended,sig,wanet,noise}; seeds=${4:-0,1,2}
cd "$(dirname "$0")/../.."
jobs=()
for s in ${seeds//,/ }; do for a in ${attacks//,/ }; do jobs+=("$a $s"); done; done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -L 1 bash -c '.venv/bin/python benchmarks/research/${PROTO:-proto}.py $0 $1 '"'$cfg'"' '"$tag"
