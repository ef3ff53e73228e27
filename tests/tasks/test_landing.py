"""The landing zone: which keys count, the watermark, S3/MinIO notifications, dedupe keys."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from lifecycle.errors import LifecycleError
from tasks.landing import (
    LANDED_EVENT,
    LandedObject,
    Watermark,
    dataset_of,
    landed_event,
    list_landing,
    load_watermark,
    notified_objects,
    parse_notification,
    plan_scan,
    read_notification,
    save_watermark,
)

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


def obj(key: str, etag: str = "e1", minutes: float = 0.0) -> LandedObject:
    return LandedObject(uri=f"s3://b/p/{key}", key=key, dataset=key.split("/")[1], etag=etag,
                        modified=T0 + timedelta(minutes=minutes))


@pytest.mark.parametrize("key, expected", [
    ("landing/tickets/a.csv", "tickets"),
    ("landing/tickets/2026/05/a.csv", "tickets"),
    ("landing/a.csv", None),                      # directly in the zone: no dataset
    ("landing/tickets/_tmp/a.csv", None),         # temporary upload part
    ("landing/tickets/.a.csv.swp", None),         # hidden
    ("landing/Tickets/a.csv", None),              # not a dataset name
    ("records/dataset/x.json", None),
])
def test_dataset_of_a_key(key, expected):
    assert dataset_of(key) == expected


def test_first_scan_announces_everything_then_nothing():
    objects = [obj("landing/tickets/a.csv", minutes=0), obj("landing/tickets/b.csv", minutes=1)]
    new, mark = plan_scan(objects, Watermark())
    assert [o.key for o in new] == ["landing/tickets/a.csv", "landing/tickets/b.csv"]
    again, same = plan_scan(objects, mark)
    assert again == [] and same.since == mark.since


def test_late_object_inside_the_overlap_is_announced_once():
    """An upload that started earlier but finished later has an older LastModified than the watermark."""
    _, mark = plan_scan([obj("landing/tickets/b.csv", minutes=5)], Watermark())
    late = obj("landing/tickets/a.csv", minutes=3)
    new, mark2 = plan_scan([late, obj("landing/tickets/b.csv", minutes=5)], mark, overlap=timedelta(minutes=10))
    assert [o.key for o in new] == ["landing/tickets/a.csv"]
    assert plan_scan([late, obj("landing/tickets/b.csv", minutes=5)], mark2)[0] == []


def test_overwritten_object_is_new_again_and_old_objects_are_forgotten():
    _, mark = plan_scan([obj("landing/tickets/a.csv", "e1", 0)], Watermark())
    new, mark = plan_scan([obj("landing/tickets/a.csv", "e2", 1)], mark)
    assert [o.etag for o in new] == ["e2"]
    much_later = obj("landing/tickets/z.csv", "e9", 120)
    _, mark = plan_scan([obj("landing/tickets/a.csv", "e2", 1), much_later], mark, overlap=timedelta(minutes=10))
    assert set(mark.seen) == {"landing/tickets/z.csv"}  # the seen set stays bounded by the overlap


def test_watermark_round_trips_through_the_store(lake):
    assert load_watermark(lake) == Watermark()
    _, mark = plan_scan([obj("landing/tickets/a.csv")], Watermark())
    save_watermark(lake, mark)
    assert load_watermark(lake) == mark


def test_list_landing_on_a_file_lake(lake):
    lake.write_bytes("landing/tickets/a.csv", b"x,y\n1,2\n")
    time.sleep(0.01)
    lake.write_bytes("landing/tickets/b.csv", b"x,y\n3,4\n")
    lake.write_bytes("landing/tickets/_part/c.csv", b"partial")
    lake.write_bytes("records/dataset/r.json", b"{}")
    found = list_landing(lake)
    assert [o.key for o in found] == ["landing/tickets/a.csv", "landing/tickets/b.csv"]
    assert found[0].uri == lake.uri("landing/tickets/a.csv") and found[0].dataset == "tickets"
    lake.write_bytes("landing/tickets/a.csv", b"x,y\n1,2\n5,6\n")
    assert list_landing(lake)[-1].etag != found[0].etag  # a rewrite changes the ETag stand-in


def test_list_landing_on_s3(s3_lake):
    s3_lake.write_bytes("landing/churn/2026-05-01.csv", b"a,b\n1,2\n")
    [found] = list_landing(s3_lake)
    assert found.dataset == "churn" and found.uri == s3_lake.uri("landing/churn/2026-05-01.csv")
    assert len(found.etag) == 32 and '"' not in found.etag  # the S3 ETag (MD5), unquoted


def s3_event(bucket: str, key: str, name: str = "ObjectCreated:Put", etag: str = "abc") -> dict:
    return {"eventName": name, "eventTime": "2026-05-01T12:00:00.000Z",
            "s3": {"bucket": {"name": bucket}, "object": {"key": key, "eTag": etag, "size": 7}}}


def test_parse_s3_and_minio_notifications():
    aws = {"Records": [s3_event("b", "p/landing/tickets/new+file%281%29.csv"),
                       s3_event("b", "p/landing/tickets/x.csv", name="ObjectRemoved:Delete")]}
    minio = {"EventName": "s3:ObjectCreated:Put", "Key": "b/p/landing/tickets/m.csv",
             "Records": [s3_event("b", "p/landing/tickets/m.csv", name="s3:ObjectCreated:Put")]}
    parsed = parse_notification(aws)
    assert [(n.bucket, n.key) for n in parsed] == [("b", "p/landing/tickets/new file(1).csv")]
    assert parsed[0].event_time == datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
    assert [n.key for n in parse_notification([aws, minio])] == ["p/landing/tickets/new file(1).csv",
                                                                 "p/landing/tickets/m.csv"]


@pytest.mark.parametrize("text, message", [
    ("not json", "not JSON"),
    (json.dumps({"hello": 1}), "not an S3 event notification"),
    (json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {"object": {"key": "k"}}}]}), "s3.bucket.name"),
])
def test_bad_notifications_fail_in_one_line(text, message):
    with pytest.raises(LifecycleError, match=message) as err:
        read_notification(text, "event.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("event.json")


def test_notified_objects_keep_only_this_stores_landing_zone(s3_lake):
    bucket, prefix = s3_lake.url.removeprefix("s3://").split("/", 1)
    notified = parse_notification({"Records": [
        s3_event(bucket, f"{prefix}/landing/tickets/a.csv"),
        s3_event(bucket, f"{prefix}/records/x.json"),
        s3_event("other-bucket", f"{prefix}/landing/tickets/a.csv"),
    ]})
    landed, skipped = notified_objects(s3_lake, notified)
    assert [o.uri for o in landed] == [s3_lake.uri("landing/tickets/a.csv")]
    assert len(skipped) == 2


def test_dedupe_key_and_event_id_follow_object_and_content():
    a1, a1_again = obj("landing/tickets/a.csv", "e1"), obj("landing/tickets/a.csv", "e1", minutes=9)
    a2, b1 = obj("landing/tickets/a.csv", "e2"), obj("landing/tickets/b.csv", "e1")
    assert a1.dedupe_key == a1_again.dedupe_key and a1.event_id == a1_again.event_id
    assert len({a1.dedupe_key, a2.dedupe_key, b1.dedupe_key}) == 3
    event = landed_event(a1)
    assert event["event"] == LANDED_EVENT and event["id"] == a1.event_id
    assert event["resource"]["prefect.resource.id"] == a1.uri
    assert event["resource"]["lifecycle.etag"] == "e1" and event["resource"]["lifecycle.dataset"] == "tickets"


def test_object_etag_names_a_landing_object_and_nothing_else(lake, tmp_path):
    from tasks.landing import object_etag

    lake.write_bytes("landing/tickets/a.csv", b"id\n1\n")
    etag = object_etag(lake, lake.uri("landing/tickets/a.csv"))
    assert etag and etag == object_etag(lake, lake.uri("landing/tickets/a.csv"))
    lake.write_bytes("landing/tickets/a.csv", b"id\n1\n2\n")  # rewritten: a new object
    assert object_etag(lake, lake.uri("landing/tickets/a.csv")) != etag
    assert object_etag(lake, lake.uri("landing/tickets/none.csv")) is None
    assert object_etag(lake, lake.uri("landing/tickets/*.csv")) is None  # a glob is not one object
    assert object_etag(lake, lake.uri("elsewhere/a.csv")) is None and object_etag(lake, str(tmp_path)) is None
