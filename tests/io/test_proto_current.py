"""The committed protobuf modules match proto/ (regenerate with
``python -m stackduck_trio._proto.generate``)."""

from __future__ import annotations

import pathlib

from stackduck_trio._proto import generate


def test_generated_modules_are_current(tmp_path: pathlib.Path) -> None:
    written = generate.generate(tmp_path)
    assert written
    stale = [
        path.name
        for path in written
        if path.read_text() != (generate.PACKAGE_DIR / path.name).read_text()
    ]
    assert not stale, f"run `python -m stackduck_trio._proto.generate`: {stale} are out of date"


def test_original_contract_is_kept() -> None:
    # Field numbers of the original Stackduck proto (design/ORIGINAL_API.md).
    from stackduck_trio._proto import stackduck_pb2 as pb

    expected = {
        "EnqueueJobRequest": {
            "job_type": 1,
            "payload": 2,
            "priority": 3,
            "delay": 4,
            "max_retries": 5,
            "scheduled_at": 6,
        },
        "EnqueueJobResponse": {"job_id": 1, "success": 2, "error_message": 3},
        "DequeueJobRequest": {"queue_name": 1, "worker_id": 2},
        "DequeueJobResponse": {"job": 1, "success": 2, "error_message": 3},
        "ConsumeJobsRequest": {"worker_id": 1, "job_types": 2},
        "JobMessage": {"job": 1, "notification_type": 2},
        "CompleteJobRequest": {"job_id": 1},
        "FailJobRequest": {"job_id": 1, "error_message": 2},
        "RetryJobRequest": {"job_id": 1, "error_message": 2},
        "GrpcJob": {
            "id": 1,
            "job_type": 2,
            "payload": 3,
            "status": 4,
            "priority": 5,
            "retry_count": 6,
            "max_retries": 7,
            "error_message": 8,
            "delay": 9,
            "scheduled_at": 10,
            "started_at": 11,
            "completed_at": 12,
            "created_at": 13,
            "updated_at": 14,
        },
    }
    for message, fields in expected.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        for name, number in fields.items():
            assert descriptor.fields_by_name[name].number == number, (message, name)
    service = pb.DESCRIPTOR.services_by_name["StackDuckService"]
    assert pb.DESCRIPTOR.package == "stackduck"
    for rpc in (
        "EnqueueJob",
        "ConsumeJobs",
        "CompleteJob",
        "FailJob",
        "RetryJob",
        "DequeueJob",
        "DequeueRetriedJob",
    ):
        assert rpc in service.methods_by_name
