"""The re-ID image towers around open_clip's CLIP image encoders.

CLIP-ReID (Li, Sun, Li, AAAI 2023, arXiv 2211.13977) fine-tunes CLIP's image encoder for re-ID.
Everything CLIP is open_clip's (``open_clip.CLIP``: modules, weights, tokenizer), loaded by
:func:`reidlib.weights.clip.load_clip` (the ``openai`` tag, a local file or ``none``; also the tiny
test architectures ``vit-tiny``, ``vit-tiny8``, ``rn-tiny``). This file adapts the image tower to
re-ID: non-square input, positional embedding resized the reference's way, overlapping patches
(OLP), the SIE bias on the CLS token, and three features per image.

Example::

    clip = load_clip("vit-tiny", "none")
    vit = ReIDViT(clip.visual, image_size=(128, 64), stride=16)
    f_last, f, f_proj = vit(torch.randn(2, 3, 128, 64))
    vit.grid                                     # (8, 4)
    f.shape, f_proj.shape                        # (2, 64), (2, 32)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

# load_clip and friends live with the other weights formats; importable from here as before
from ..weights.clip import TINY_CONFIGS, load_clip, read_state_dict  # noqa: F401
from .attention import split_attention

# --------------------------------------------------------------------------- re-ID image towers

def resize_grid_embedding(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                          n_prefix: int = 1) -> torch.Tensor:
    """Resize a [prefix + h*w, C] positional embedding to a new (h, w) grid.

    As the reference: the prefix rows (CLS) are kept; the grid is resized with bilinear
    interpolation, align_corners=False and no antialiasing (open_clip's own loader uses bicubic +
    antialias, which gives different features); rows stay in row-major order.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos.clone()
    prefix, grid = pos[:n_prefix], pos[n_prefix:]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)
    return torch.cat([prefix, grid], dim=0)


class ReIDViT(nn.Module):
    """open_clip's VisionTransformer (its modules and weights) with CLIP-ReID's changes.

    Patch stride ``stride`` (12 = overlapping patches), a (h, w) token grid for a non-square
    input with the positional embedding resized to it, attention split into q/k/v/out Linears
    (same maths; LoRA targets), and three outputs: the CLS token before the last block
    (``f_last``), after the last block and ``ln_post`` (``f``), and ``f @ proj`` (``f_proj``).
    """

    def __init__(self, vit: VisionTransformer, image_size=(256, 128), stride: int = 16):
        super().__init__()
        if vit.attn_pool is not None or not isinstance(vit.patch_dropout, nn.Identity) or vit.final_ln_after_pool:
            raise ValueError("only CLIP's plain ViT (CLS pooling, no patch dropout) is supported")
        patch = vit.conv1.kernel_size[0]
        height, width = image_size
        self.grid = ((height - patch) // stride + 1, (width - patch) // stride + 1)
        self.image_size = (height, width)
        vit.conv1.stride = (stride, stride)
        vit.positional_embedding = nn.Parameter(
            resize_grid_embedding(vit.positional_embedding.data, vit.grid_size, self.grid))
        vit.grid_size, vit.image_size = self.grid, self.image_size
        for block in vit.transformer.resblocks:
            split_attention(block)
        self.vit = vit
        self.width = vit.class_embedding.shape[0]
        self.embed_dim = vit.proj.shape[1]

    def forward(self, x: torch.Tensor, cls_bias: torch.Tensor | None = None):
        """Images [B, 3, H, W] -> (f_last, f, f_proj); ``cls_bias`` [B, width] is the SIE term."""
        vit = self.vit
        x = vit.conv1(x).flatten(2).transpose(1, 2)                  # [B, h*w, width]
        cls = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        if cls_bias is not None:                                      # SIE: CLS token only, before pos
            cls = cls + cls_bias.to(x.dtype).unsqueeze(1)
        x = torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype)
        x = vit.ln_pre(x)
        blocks = vit.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        f_last = x[:, 0]
        f = vit.ln_post(blocks[-1](x)[:, 0])
        return f_last, f, f @ vit.proj


class ReIDResNet(nn.Module):
    """open_clip's ModifiedResNet (RN50) with CLIP-ReID's changes.

    layer4 runs at stride 1 (a 16x8 map for 256x128 input), the attention pool's positional
    embedding is resized from 7x7 to that map, and the outputs are the avg-pooled layer3
    (``f_last``), the avg-pooled layer4 (``f``) and the attention pool's global token (``f_proj``,
    already in the text embedding space).
    """

    def __init__(self, resnet: ModifiedResNet, image_size=(256, 128)):
        super().__init__()
        height, width = image_size
        if height % 16 or width % 16:
            raise ValueError(f"model.image_size {list(image_size)}: ResNet input sides must be multiples of 16")
        first = resnet.layer4[0]
        first.avgpool = nn.Identity()            # the anti-aliased stride-2 of ModifiedResNet -> 1
        if first.downsample is not None:
            first.downsample._modules["-1"] = nn.Identity()
        first.stride = 1
        pool = resnet.attnpool
        native = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
        self.grid = (height // 16, width // 16)
        pool.positional_embedding = nn.Parameter(
            resize_grid_embedding(pool.positional_embedding.data, (native, native), self.grid))
        self.resnet = resnet
        self.image_size = (height, width)
        self.width = pool.k_proj.in_features
        self.embed_dim = pool.c_proj.out_features

    def forward(self, x: torch.Tensor, cls_bias: torch.Tensor | None = None):
        """Images [B, 3, H, W] -> (f_last, f, f_proj)."""
        if cls_bias is not None:
            raise ValueError("SIE applies to ViT image encoders only")
        net = self.resnet
        x3 = net.layer3(net.layer2(net.layer1(net.stem(x))))
        x4 = net.layer4(x3)
        return x3.mean(dim=(2, 3)), x4.mean(dim=(2, 3)), net.attnpool(x4)


def reid_image_tower(visual: nn.Module, image_size=(256, 128), stride: int = 0) -> nn.Module:
    """The re-ID wrapper for an open_clip image tower (ViT or ModifiedResNet).

    ``stride`` 0 means the patch size (no overlap); a smaller one gives overlapping patches."""
    if isinstance(visual, VisionTransformer):
        return ReIDViT(visual, image_size, stride or visual.conv1.kernel_size[0])
    if isinstance(visual, ModifiedResNet):
        if stride not in (0, 16):
            raise ValueError("model.stride (overlapping patches) applies to ViT image encoders only")
        return ReIDResNet(visual, image_size)
    raise ValueError(f"unsupported image tower {type(visual).__name__}")
