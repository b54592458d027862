import os

from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

EMPTY_PARAMS = str(Path(__file__).parent / "empty-params.yaml")  # `--params` that gives no defaults
S3_BUCKET = "team-stores"  # the bucket the `s3` fixture's server holds


@pytest.fixture(autouse=True, scope="session")
def _one_thread_torch():
    """Tests run one torch thread: results do not depend on the core count, and runs stay steady."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on localhost (no network) holding S3_BUCKET, with the AWS_* environment pointing at it for
    the module's tests (s3fs's cached filesystems are dropped on both ends: they keep the endpoint they were made
    with). Skipped where the test extras (moto, s3fs) are not installed."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        import boto3

        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
