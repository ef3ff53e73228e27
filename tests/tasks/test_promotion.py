"""The champion's history as a chain: read back from the champion's audit, one record at a time.

MLflow is stood in for by the versions it returns (name, version, tags): the chain logic reads only those.
"""

from __future__ import annotations

from types import SimpleNamespace

from tasks import promotion
from tasks.records import save_record


def _mv(version: str, **tags: str) -> SimpleNamespace:
    return SimpleNamespace(name="tickets", version=version, tags=tags)


def _audit(store, action: str, version: str, previous: str | None, behind=None):
    audit = promotion.new_audit("tickets", "tickets", action, version, previous, True, action, "test",
                                promotion._link(behind))
    save_record(store, audit)
    return audit


def test_rollback_goes_back_along_the_chain_not_forward(lake):
    v1 = _audit(lake, "register", "1", None)
    v2 = _audit(lake, "register", "2", "1", behind=v1)
    v3 = _audit(lake, "promote", "3", "2", behind=v2)
    assert promotion.previous_champion(lake, _mv("3", **{promotion.CHAMPION_AUDIT: v3.id})) == ("2", v2)
    # Rolled back to v2: the rollback names the promotion it went back to, so the next goes to v1.
    back = _audit(lake, "rollback", "2", "3", behind=v2)
    champion = _mv("2", **{promotion.CHAMPION_AUDIT: back.id})
    assert promotion.promotion_in_effect(lake, champion) == v2
    assert promotion.previous_champion(lake, champion) == ("1", v1)
    assert promotion.previous_champion(lake, _mv("1", **{promotion.CHAMPION_AUDIT: v1.id})) == (None, None)


def test_an_audit_about_another_version_is_not_the_champions(lake):
    v1 = _audit(lake, "register", "1", None)
    assert promotion.champion_audit(lake, _mv("2", **{promotion.CHAMPION_AUDIT: v1.id})) is None
    assert promotion.champion_audit(lake, _mv("2", **{promotion.CHAMPION_AUDIT: "0" * 16})) is None


def test_versions_promoted_before_the_chain_fall_back_to_their_register_tags(lake):
    legacy = _mv("4", **{"lifecycle.promoted": "true", "lifecycle.champion_version": "2"})
    assert promotion.previous_champion(lake, legacy) == ("2", None)
    assert promotion.previous_champion(lake, _mv("5", **{"lifecycle.promoted": "false"})) == (None, None)


def test_the_champions_record_is_found_by_its_tag_without_a_listing(lake, monkeypatch):
    from lifecycle.records import ModelVersion

    record = ModelVersion(id="mv2", dataset="tickets", model_name="tickets", version="2", run_id="run",
                          trained_model="t", aliases=["challenger", "champion"], promoted=True, decision="",
                          metric="accuracy", challenger_value=1.0)
    save_record(lake, record)
    monkeypatch.setattr(type(lake), "list_keys", lambda *a, **k: (_ for _ in ()).throw(AssertionError("listed")))
    assert promotion.record_of(lake, _mv("2", **{promotion.RECORD_TAG: "mv2"})) == record
