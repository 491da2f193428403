"""The catalog (variants table) mirrors the signed TUF targets, idempotently."""
import sqlalchemy as sa

from edgefleet.controller.db.models import Variant
from edgefleet.controller.mirror import mirror_targets
from tests.support.signed_repo import SignedRepo


def test_signed_targets_are_mirrored_once(tmp_path, db):
    with SignedRepo.create(tmp_path) as repo:
        repo.publish("1.0.0", variants=("cpu-fp32", "cpu-int8"))
        assert mirror_targets(db, repo.repository) == 2
        assert mirror_targets(db, repo.repository) == 0
        repo.publish("1.1.0", variants=("cpu-fp32",), seed=1)
        assert mirror_targets(db, repo.repository) == 1
    with db.unit_of_work() as session:
        rows = {(v.version, v.variant): v for v in session.scalars(sa.select(Variant))}
    assert set(rows) == {("1.0.0", "cpu-fp32"), ("1.0.0", "cpu-int8"), ("1.1.0", "cpu-fp32")}
    fp32 = rows[("1.0.0", "cpu-fp32")]
    assert fp32.size_bytes == 4096 and fp32.release == 1 and fp32.target_path == "digits/1.0.0/cpu-fp32.onnx"
    assert rows[("1.1.0", "cpu-fp32")].release == 2
    assert fp32.golden_path == "digits/1.0.0/cpu-fp32.golden.npz"
