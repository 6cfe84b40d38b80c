import torch
def shuffle_units(pix, unit, gen, ratio=0.0):
    b, c, h, w = pix.shape; gh, gw = h // unit, w // unit; n = gh * gw
    x = pix.reshape(b, c, gh, unit, gw, unit).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, unit, unit)
    perm = torch.rand(b, n, generator=gen).argsort(1)
    x = x.gather(1, perm[:, :, None, None, None].expand_as(x))
    if ratio > 0:
        k = int(ratio * n + .5); m = torch.zeros(b, n, dtype=torch.bool); m.scatter_(1, torch.rand(b, n, generator=gen).argsort(1)[:, :k], True)
        mean = pix.mean((2, 3))[:, None, :, None, None].expand_as(x)
        x = torch.where(m[:, :, None, None, None], mean, x)
    return x.reshape(b, gh, gw, c, unit, unit).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
