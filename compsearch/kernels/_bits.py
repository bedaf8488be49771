"""Dense bit packing of unsigned n-bit codes: eight codes per ``n`` bytes, LSB first."""

from __future__ import annotations

import torch

from compsearch.errors import KernelError


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-wide codes (values < 2**bits) into ``ceil(numel * bits / 8)`` bytes."""
    if not 2 <= bits <= 8:
        raise KernelError(f"bits: expected an integer in [2, 8], but got {bits!r}.")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise KernelError(f"pack_codes: expected codes below {1 << bits}, got {int(flat.max())}.")
    count = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8)
    padded = torch.zeros((count + 7) // 8 * 8, dtype=torch.int64, device=flat.device)
    padded[:count] = flat
    chunks = padded.reshape(-1, 8)  # eight codes make exactly `bits` bytes
    shifts = torch.arange(8, device=flat.device) * bits
    words = (chunks << shifts).sum(-1)
    byte_shifts = torch.arange(bits, device=flat.device) * 8
    packed = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).reshape(-1)
    return packed[: (count * bits + 7) // 8].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` unsigned codes as uint8."""
    if bits == 8:
        return packed[:count].clone()
    data = packed.to(torch.int64)
    total = (count + 7) // 8 * bits
    padded = torch.zeros(total, dtype=torch.int64, device=data.device)
    padded[: data.numel()] = data
    chunks = padded.reshape(-1, bits)
    byte_shifts = torch.arange(bits, device=data.device) * 8
    words = (chunks << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=data.device) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8
