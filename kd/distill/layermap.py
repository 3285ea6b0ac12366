"""Which teacher layer each student layer imitates.

Layers are 1-based: layer 0 is the embedding output, and student layer 0 is always paired with
teacher layer 0 implicitly, so a map lists only the transformer layers 1..n_student.
"""

from __future__ import annotations


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """TinyBERT's uniform strategy (Jiao et al. 2020): student layer i -> teacher ceil(i·M/N).

    Returns the 1-based teacher layer for each student layer i = 1..n_student; the last student
    layer always maps to the last teacher layer. E.g. 4↔6 -> [2, 3, 5, 6], 4↔12 -> [3, 6, 9, 12].
    """
    if n_student <= 0 or n_teacher <= 0:
        raise ValueError(
            f"layer counts must be positive, got n_student={n_student}, n_teacher={n_teacher}"
        )
    # Integer ceiling: float division can round 3 * 12 / 4 to 8.999… and shift a layer.
    return [-(-(i * n_teacher) // n_student) for i in range(1, n_student + 1)]


def _problem(spec: list[int], n_student: int, n_teacher: int) -> str | None:
    if len(spec) != n_student:
        return (
            f"it has {len(spec)} entries but the student has {n_student} layers "
            f"(one entry per student layer is needed)"
        )
    for i, entry in enumerate(spec, start=1):
        if isinstance(entry, bool) or not isinstance(entry, int):
            return f"entry {entry!r} (student layer {i}) is not an integer"
        if entry < 1:
            return (
                f"entry {entry} (student layer {i}) is below 1; layer 0 is the embedding output "
                f"and is mapped implicitly, so list only transformer layers 1..{n_teacher}"
            )
        if entry > n_teacher:
            return f"entry {entry} (student layer {i}) points past the teacher's {n_teacher} layers"
    for i in range(1, len(spec)):
        if spec[i] < spec[i - 1]:
            return (
                f"it decreases at student layer {i + 1} ({spec[i - 1]} -> {spec[i]}); deeper "
                f"student layers must imitate teacher layers at least as deep"
            )
    return None


def resolve_layer_map(spec: str | list[int], n_student: int, n_teacher: int) -> list[int]:
    """Turn the `layer_map` parameter into a validated 1-based list of teacher layers.

    `spec` is "uniform" or an explicit list with one teacher layer per student layer, entries in
    1..n_teacher and non-decreasing. Layer 0 (embeddings) is always mapped to 0 and is not part
    of the list.
    """
    if isinstance(spec, str):
        if spec == "uniform":
            return uniform_layer_map(n_student, n_teacher)
        problem = f"the string {spec!r} is not a known strategy (only 'uniform' is)"
    else:
        spec = list(spec)
        problem = _problem(spec, n_student, n_teacher)
        if problem is None:
            return spec
    example = uniform_layer_map(n_student, n_teacher)
    raise ValueError(
        f"`layer_map` in params.yaml is invalid for a {n_student}-layer student and a "
        f"{n_teacher}-layer teacher: {problem}. Fix it by setting `layer_map: uniform`, or by "
        f"listing {n_student} non-decreasing 1-based teacher layers in 1..{n_teacher}, one per "
        f"student layer (e.g. {example}); the embedding layer 0 "
        f"is mapped implicitly and must not be listed."
    )
