"""Artifact store on S3 or any S3-compatible server (MinIO, Ceph, moto) via boto3.

Objects are written whole (S3 PUTs are atomic), read with Range GETs, and handed
to devices as presigned URLs. Credentials come from boto3's usual chain
(environment, shared config, instance role).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.response import StreamingBody

from ..config import StoreConfig
from ..errors import NotFound, Unavailable
from . import ArtifactStore, check_key

CHUNK = 1024 * 1024
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 3
_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3Store(ArtifactStore):
    def __init__(self, config: StoreConfig):
        if not config.bucket:
            raise Unavailable("S3 store has no bucket: set bucket under [store] in config.toml")
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix.strip("/")
        self.where = "/".join(filter(None, (f"s3://{self.bucket}", self.prefix))) + (
            f" at {config.endpoint_url}" if config.endpoint_url else ""
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=config.endpoint_url or None,
            region_name=config.region,
            config=Config(
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                # S3-compatible servers rarely have per-bucket DNS names.
                s3={"addressing_style": "path" if config.endpoint_url else "auto"},
            ),
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """boto3's exceptions -> NotFound / Unavailable, one line each."""
        try:
            yield
        except ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _MISSING:
                raise NotFound(f"{key} is not in the store") from None
            if code == "NoSuchBucket":
                raise Unavailable(f"bucket {self.bucket!r} does not exist: create it or fix [store] bucket") from e
            raise Unavailable(f"S3 store {self.where} refused {key}: {code} {error.get('Message', '')}".rstrip()) from e
        except S3UploadFailedError as e:   # upload_file wraps the ClientError in text
            raise Unavailable(f"S3 store {self.where} refused {key}: {e}") from e
        except NoCredentialsError as e:
            raise Unavailable(
                "S3 store has no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
            ) from e
        except BotoCoreError as e:
            raise Unavailable(f"S3 store {self.where} is unreachable: {e}") from e

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def _head(self, key: str) -> dict:
        with self._errors(key):
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except NotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The request is made now (so NotFound is raised here); the body streams lazily."""
        request = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or end is not None:
            request["Range"] = f"bytes={start}-{'' if end is None else end}"
        with self._errors(key):
            try:
                body = self.client.get_object(**request)["Body"]
            except ClientError as e:
                # Like a file read past its end: a range starting beyond the object is empty.
                if e.response.get("Error", {}).get("Code") == "InvalidRange":
                    return iter(())
                raise
        return self._stream(key, body)

    def _stream(self, key: str, body: StreamingBody) -> Iterator[bytes]:
        with self._errors(key), contextlib.closing(body):
            yield from body.iter_chunks(CHUNK)

    def list(self, prefix: str) -> list[str]:
        # Prefixes name directories, as in LocalStore: "a/b" does not match "a/bc".
        base = self._key(prefix.strip("/")) + "/" if prefix.strip("/") else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        with self._errors(prefix or "/"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def download_url(self, key: str) -> str:
        with self._errors(key):
            return self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(key)},
                ExpiresIn=self.config.presign_ttl_s,
            )
