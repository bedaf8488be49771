"""Size: the exact bytes of the file that would ship — header, metadata and all.

A candidate's artifact is the packed safetensors file its recipe writes (``CompressedModel.save``;
the final run writes the same bytes), the teacher's is its float state dict as safetensors
(:func:`float_artifact`). ``size_bytes`` is the length of those bytes: what ``os.path.getsize``
says of the written file.
"""

from __future__ import annotations

from safetensors.torch import save
from torch import nn

from compsearch.objectives.base import Candidate, Objective


def float_artifact(model: nn.Module) -> bytes:
    """The model's state dict as it would be saved unquantized (the teacher's artifact)."""
    state = {}
    seen = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().contiguous().cpu()
        pointer = tensor.untyped_storage().data_ptr()
        state[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return save(state)


class SizeObjective(Objective):
    name = "size_bytes"
    direction = "minimize"
    unit = "bytes"

    def __init__(self) -> None:
        self.teacher_bytes = 0

    def restore(self, teacher: dict[str, float]) -> None:
        self.teacher_bytes = int(teacher["size_bytes"])

    def prepare(self, reference: Candidate) -> None:
        self.teacher_bytes = len(reference.artifact)

    def measure(self, candidate: Candidate) -> dict[str, float]:
        size = len(candidate.artifact)
        out = {self.name: float(size), "size_mb": size / 1e6}
        if candidate.student is not None:
            out["params"] = float(sum(p.numel() for p in candidate.student.parameters()))
        if self.teacher_bytes:
            out["size_ratio"] = self.teacher_bytes / size
        return out
