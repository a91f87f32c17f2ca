"""SkyPilot 0.14.1 without a network or a cloud account, for tests (see the shared skypilot-offline note).

- `prepare(home)`: a temp HOME whose ~/.sky/catalogs/v8/ holds small pricing CSVs for Lambda and AWS
  (no `.meta/*.md5` beside them, so SkyPilot treats them as user-modified and never re-downloads);
- `enable(monkeypatch, clouds)`: monkeypatch SkyPilot's cached enabled-cloud check, as SkyPilot's own
  tests do, so the optimizer runs in-process.

HOME, SKY_RUNTIME_DIR and SKYPILOT_DISABLE_USAGE_COLLECTION must be set before `import sky`: tests
that import sky do it in tests/conftest.py-free subprocesses or via `sky_home` set at session start.
"""

from __future__ import annotations

from pathlib import Path

LAMBDA_GPU = "{'Gpus': [{'Name': '%s', 'Manufacturer': 'NVIDIA', 'Count': %d.0, 'MemoryInfo': {'SizeInMiB': %d}}], 'TotalGpuMemoryInMiB': %d}"
AWS_GPU = "{'Gpus': [{'Name': '%s', 'Manufacturer': 'NVIDIA', 'Count': %d, 'MemoryInfo': {'SizeInMiB': %d}}], 'TotalGpuMemoryInMiB': %d}"


def _lambda_row(itype, gpu, n, vcpus, mem, price, region, mib):
    info = LAMBDA_GPU % (gpu, n, mib, mib * n)
    return f'{itype},{gpu},{n},{vcpus},{mem},{price},{region},"{info}",'


def _aws_row(itype, gpu, n, vcpus, mem, price, spot, region, zone, mib):
    info = AWS_GPU % (gpu, n, mib, mib * n) if gpu else ""
    acc = f"{gpu},{n}" if gpu else ","
    return (f'{itype},{acc},{vcpus},{mem},"{info}",{price},{spot},{region},{zone},x86_64,'
            f',False,,,{32 if gpu == "H100" else 1}')


CATALOGS = {
    "common/accelerators.csv": "AcceleratorName,Clouds\nH100,\"AWS,Lambda\"\nA100-80GB,\"AWS,Lambda\"\nA10,Lambda\n",
    "common/metadata.csv": "GPU,MemoryGB,Manufacturer\nH100,80,NVIDIA\nA100-80GB,80,NVIDIA\nA10,24,NVIDIA\n",
    "lambda/vms.csv": "\n".join([
        "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice",
        _lambda_row("gpu_8x_h100_sxm5", "H100", 8, 208, 1800, 23.92, "us-east-1", 81920),
        _lambda_row("gpu_8x_h100_sxm5", "H100", 8, 208, 1800, 23.92, "us-west-1", 81920),
        _lambda_row("gpu_1x_h100_pcie", "H100", 1, 26, 200, 2.49, "us-east-1", 81920),
        _lambda_row("gpu_8x_a100_80gb_sxm4", "A100-80GB", 8, 240, 1800, 14.32, "us-east-1", 81920),
        _lambda_row("gpu_1x_a10", "A10", 1, 30, 200, 0.75, "us-east-1", 24576),
    ]) + "\n",
    "aws/vms.csv": "\n".join([
        "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,"
        "AvailabilityZone,Arch,LocalDiskType,NVMeSupported,LocalDiskSize,LocalDiskCount,MaximumEfaInterfaces",
        _aws_row("p5.48xlarge", "H100", 8, 192, 2048, 98.32, 40.0, "us-east-1", "us-east-1a", 81920),
        _aws_row("p5.48xlarge", "H100", 8, 192, 2048, 98.32, 42.0, "us-west-2", "us-west-2a", 81920),
        _aws_row("p4de.24xlarge", "A100-80GB", 8, 96, 1152, 40.96, 16.0, "us-east-1", "us-east-1a", 81920),
        _aws_row("m6i.2xlarge", "", 0, 8, 32, 0.384, 0.15, "us-east-1", "us-east-1a", 0),
        _aws_row("m6i.2xlarge", "", 0, 8, 32, 0.384, 0.15, "us-west-2", "us-west-2a", 0),
    ]) + "\n",
    "aws/images.csv": "Tag,Region,OS,OSVersion,ImageId,CreationDate\n"
                      "skypilot:custom-gpu-ubuntu,us-east-1,ubuntu,22.04,ami-0123456789abcdef0,20250101\n"
                      "skypilot:custom-gpu-ubuntu,us-west-2,ubuntu,22.04,ami-0123456789abcdef1,20250101\n"
                      "skypilot:custom-cpu-ubuntu,us-east-1,ubuntu,22.04,ami-0123456789abcdef2,20250101\n"
                      "skypilot:custom-cpu-ubuntu,us-west-2,ubuntu,22.04,ami-0123456789abcdef3,20250101\n",
    "aws/instance_quota_mapping.csv": "InstanceType,OnDemandInstanceCode,SpotInstanceCode\n"
                                      "p5.48xlarge,L-417A185B,L-7212CCBC\np4de.24xlarge,L-417A185B,L-7212CCBC\n"
                                      "m6i.2xlarge,L-1216C47A,L-34B43A08\n",
}


def prepare(home: Path) -> Path:
    """Write the catalog fixture under home/.sky/catalogs/v8/; return home."""
    root = Path(home) / ".sky" / "catalogs" / "v8"
    for rel, text in CATALOGS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Path(home)


def sky_env(home: Path) -> dict:
    """Environment variables to set before `import sky`."""
    return {"HOME": str(home), "SKY_RUNTIME_DIR": str(home), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
            "SKYPILOT_API_SERVER_ENDPOINT": "http://127.0.0.1:9"}  # never start (or reach) an API server


def enable(monkeypatch, clouds=("lambda", "aws")) -> None:
    """Pretend `sky check` enabled these clouds (SkyPilot's own tests patch the same function)."""
    import sky
    from sky import check as sky_check

    objs = [sky.CLOUD_REGISTRY.from_str(c) for c in clouds]

    def fake(capability=None, raise_if_no_cloud_access=False, *args, **kwargs):
        if not objs and raise_if_no_cloud_access:
            raise sky.exceptions.NoCloudAccessError("Cloud access is not set up. Run: sky check")
        return list(objs)

    monkeypatch.setattr(sky_check, "get_cached_enabled_clouds_or_refresh", fake)


# ---- pytest fixtures (import them into a test module: `from sky_offline import sky_home, sky_mod`) ----
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sky_home(tmp_path_factory) -> Path:
    """A HOME with the catalog fixture, shared by every test that imports sky.

    One fixed path per session: each test module that imports this fixture gets its own copy of it,
    and sky can only be imported once.
    """
    home = tmp_path_factory.getbasetemp() / "sky-home"
    if not (home / ".sky" / "catalogs").is_dir():
        prepare(home)
    return home


@pytest.fixture
def sky_mod(sky_home, monkeypatch):
    """`sky`, imported (the first time) with HOME pointing at sky_home; Lambda and AWS enabled.

    HOME stays patched for the test, so whatever SkyPilot writes under ~/.sky lands in the temp HOME.
    """
    for k, v in sky_env(sky_home).items():
        monkeypatch.setenv(k, v)
    if "sky" in sys.modules:
        from sky.catalog import common

        where = getattr(common, "_ABSOLUTE_VERSIONED_CATALOG_DIR", str(sky_home))
        assert str(where).startswith(str(sky_home)), f"sky was imported with another HOME ({where})"
    import sky

    enable(monkeypatch, ("lambda", "aws"))
    return sky
