"""What is said of a model's moderation quality (moderation/reliability.py): the embedded model is measured and
not usable, any other checkpoint is not measured; both are said, only a measured usable one is not."""

from __future__ import annotations

from mistral7b.moderation.reliability import MEASURED, USABLE_UNSAFE_FLAGGED, Measured, reliability, warning
from tests.conftest import smollm2_path


def test_the_embedded_model_is_measured_and_not_a_usable_filter():
    r = reliability(smollm2_path())
    assert r["measured"] is True and r["usable"] is False
    assert r["unsafe_flagged"] == 0.0 and r["precision"] == 0.532 and "not a usable filter" in r["note"]
    assert "not a usable filter" in warning(smollm2_path())


def test_an_unmeasured_model_is_said_to_be_unverified(tmp_path):
    r = reliability(str(tmp_path / "my-model"))
    assert r["measured"] is False and r["usable"] is None
    assert "my-model" in warning(str(tmp_path / "my-model")) and "unverified" in warning(str(tmp_path / "x"))


def test_a_measured_usable_model_is_not_warned_about(monkeypatch, tmp_path):
    good = Measured(precision=0.99, recall=0.95, unsafe_flagged=USABLE_UNSAFE_FLAGGED + 0.1, roc_auc=0.99,
                    taxonomy="paper", source="test")
    monkeypatch.setitem(MEASURED, "good-7b", good)
    assert reliability(str(tmp_path / "good-7b"))["usable"] is True
    assert warning(str(tmp_path / "good-7b")) is None
