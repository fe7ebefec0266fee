"""Stand-ins for :class:`rlhf.models.FrozenLinearsInBF16` that a test swaps into a stage, to compare
a run that keeps its frozen weights in bf16 with one where autocast casts them at every op (the
stage before it kept them)."""

from __future__ import annotations

from rlhf.models import FrozenLinearsInBF16


def recording(casts: list) -> type[FrozenLinearsInBF16]:
    """The real class, noting the dtypes of the layers it holds each time it casts them."""

    class Recording(FrozenLinearsInBF16):
        def cast(self):
            super().cast()
            casts.append({m.weight.dtype for m in self.layers})
            return self

    return Recording


class CastByAutocast(FrozenLinearsInBF16):
    """Leaves the frozen weights in fp32, for autocast to cast at every op."""

    def cast(self):
        return self
