"""Example handlers for ``stackduck-trio worker examples.handlers:HANDLERS``.

A handler gets a :class:`stackduck_trio.JobInfo`; returning completes the job,
raising fails it (retried with backoff, then dead-lettered). Handlers may be
async (run in the worker's trio loop) or plain functions (run in a thread).
"""

from __future__ import annotations

import json
import logging

import trio

from stackduck_trio import JobInfo

log = logging.getLogger("examples.handlers")


async def send_email(job: JobInfo) -> None:
    message = json.loads(job.payload)
    await trio.sleep(0.01)  # stands for the call to a mail service
    print(f"email to {message.get('to')!r} sent (job {job.id}, attempt {job.attempt})")


def resize_image(job: JobInfo) -> None:
    """A blocking handler: the worker runs it in a thread."""
    spec = json.loads(job.payload)
    if "path" not in spec:
        raise ValueError("payload needs a 'path'")  # -> FailJob, retried with backoff
    print(f"resized {spec['path']}")


HANDLERS = {"email_send": send_email, "image_resize": resize_image}
