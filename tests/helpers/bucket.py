"""What the tests read back from the S3-compatible server the suite runs (the ``s3_bucket`` fixture)."""

from __future__ import annotations

from typing import Any

import boto3


def incoming_keys(s3_bucket: dict[str, Any]) -> list[str]:
    """The keys of the direct uploads (``incoming/``) now in the run's bucket."""
    client = boto3.session.Session().client("s3", endpoint_url=s3_bucket["s3_endpoint_url"])
    listed = client.list_objects_v2(Bucket=s3_bucket["s3_bucket"], Prefix=s3_bucket["s3_prefix"])
    return [o["Key"] for o in listed.get("Contents", []) if "/incoming/" in o["Key"]]
