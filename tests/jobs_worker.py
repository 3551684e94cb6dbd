"""One OS process of ``test_jobs_crash.py``: a JobService running one job on a SQLite file.

Run as ``python jobs_worker.py SPEC.json``. The spec names the settings (YAML text), the
job's kind and params and the ``jobs:`` settings. Prints one JSON line ``{"job_id": ...}``
once the job is queued, then runs until it is killed (the test SIGKILLs it mid-job). A
watchdog ends the process on its own after 60 s, so it never outlives the test.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from tokenbroker import Broker, parse_settings
from tokenbroker.config import JobsSettings
from tokenbroker.jobs.service import JobService


def main(spec_path: str) -> int:
    watchdog = threading.Timer(60, os._exit, args=(3,))
    watchdog.daemon = True
    watchdog.start()
    spec = json.loads(Path(spec_path).read_text())
    broker = Broker(parse_settings(spec["settings"], {}))
    service = JobService(broker, settings=JobsSettings(**spec["jobs"]), owner="doomed")
    service.start_background()
    job, _ = service.start(spec["kind"], spec["params"], "ops")
    print(json.dumps({"job_id": job.job_id}), flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
