"""evaluate -> report: the metrics file of one deployed student (a DVC metrics JSON), as one frozen record.

Its own module, not pipeline.records: the report stage then depends on this file and pipeline.io alone, and is
not re-run by edits to the models or the student records (dvc.yaml).
"""

from dataclasses import asdict, dataclass, field

from pipeline.errors import UserError
from pipeline.io import atomic_write_json, check_keys, finite_number, read_json


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """What `pipeline evaluate` measured of one fused student, in the order its file spells the keys."""

    student: str
    model: str
    stock_model: str
    deploy: str                     # fuse.json's deploy label: the report pools latency per deployed network
    dataset: str
    val_samples: int
    input_size: int
    top1: float
    top5: float
    params: int
    macs: int
    training_form: dict             # params and MACs before fusion
    fused_check: dict
    onnx_check: dict | None         # None: no model.onnx
    latency_ms: dict                # engine -> median batch-1 latency; None: not timed
    latency_p10_p90_ms: dict
    throughput: dict                # engine -> images/s
    throughput_batch: int
    latency_runs: int
    torch_threads: int
    teachers: list
    teacher_agreement: dict         # teacher -> top-1 agreement (%); None: skipped
    teacher_top1: dict              # teacher -> its top-1 on views and clean val, and its weights digest
    teacher_notes: dict = field(default_factory=dict)  # why a teacher was skipped; the file has the key only then
    recipe_summary: str
    val_curve: list                 # fuse.json's training curve

    @classmethod
    def read(cls, path) -> "Metrics":
        """A metrics file; an unreadable, older or edited one is one line naming the fix."""
        fix = "re-run `pipeline evaluate` for it"
        data = read_json(path, fix)
        check_keys(cls, data, str(path), fix)
        wrong = [k for k in ("params", "macs", "top1", "top5") if not finite_number(data[k])]
        latency = data["latency_ms"]
        if not isinstance(latency, dict) or not all(v is None or finite_number(v) for v in latency.values()):
            wrong.append("latency_ms")
        if wrong:
            raise UserError(f"{path}: {', '.join(wrong)} not a finite number (latency_ms: a mapping of them); {fix}")
        return cls(**data)

    def write(self, path) -> None:
        data = asdict(self)
        if not self.teacher_notes:
            del data["teacher_notes"]
        atomic_write_json(path, data)
