"""Device and link profiles: they load, every number carries a source, errors name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesplit import devices
from edgesplit.devices import (
    DeviceProfile,
    LinkProfile,
    list_devices,
    list_links,
    load_device,
    load_link,
    missing_sources,
)
from edgesplit.errors import ConfigError

REQUIRED_DEVICES = {"rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "phone-midrange"}
REQUIRED_LINKS = {"wifi", "lte", "5g", "ble", "lora"}


def test_required_profiles_exist() -> None:
    assert set(list_devices()) >= REQUIRED_DEVICES
    assert "server-cpu" in list_devices("server")
    assert "server-cpu" not in list_devices()          # not a client target
    assert set(list_devices(None)) == set(list_devices()) | set(list_devices("server"))
    assert set(list_links()) >= REQUIRED_LINKS


@pytest.mark.parametrize("name", sorted(set(list_devices(None))))
def test_every_device_number_has_a_source(name: str) -> None:
    p = load_device(name)
    assert isinstance(p, DeviceProfile)
    assert p.name == name and p.description
    assert missing_sources(p) == []
    # effective, not peak: an edge CPU reaching a TFLOP would be a typo
    assert 0 < p.effective_gflops_fp32 <= 2000
    assert p.effective_gflops_int8 >= p.effective_gflops_fp32 * 0.99
    assert 7 <= p.max_onnx_opset <= 30
    assert p.memory_mib >= 512
    assert p.execution_provider.endswith("ExecutionProvider")
    assert p.path.endswith(f"{name}.toml")


@pytest.mark.parametrize("name", sorted(REQUIRED_LINKS))
def test_every_link_number_has_a_source(name: str) -> None:
    link = load_link(name)
    assert isinstance(link, LinkProfile)
    assert missing_sources(link) == []
    assert link.uplink_mbps > 0 and link.downlink_mbps > 0 and link.rtt_ms >= 0
    assert 0 < link.duty_cycle <= 1


def test_lora_payload_and_duty_cycle() -> None:
    lora = load_link("lora")
    assert lora.max_payload_bytes == 222              # EU868 DR5, LoRaWAN Regional Parameters
    assert lora.duty_cycle == 0.01
    assert lora.overhead_bytes_per_message == 13
    assert lora.uplink_mbps == pytest.approx(0.00547)
    assert load_link("wifi").max_payload_bytes is None


def test_gflops_by_precision() -> None:
    nano = load_device("jetson-nano")
    assert nano.gflops("fp16") == nano.effective_gflops_fp16
    rpi = load_device("rpi4")
    assert rpi.effective_gflops_fp16 is None
    assert rpi.gflops("fp16") == rpi.effective_gflops_fp32   # no fast fp16 path on the CPU
    assert rpi.gflops("int8") == rpi.effective_gflops_int8
    with pytest.raises(ConfigError, match="precision"):
        rpi.gflops("fp8")


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        load_device("rpi9")
    assert "rpi4" in str(exc.value) and "jetson-nano" in str(exc.value)
    with pytest.raises(ConfigError, match="unknown device 'links'"):
        load_device("links")
    with pytest.raises(ConfigError) as exc:
        load_link("carrier-pigeon")
    assert "lora" in str(exc.value) and "wifi" in str(exc.value)


def test_load_by_path(tmp_path: Path) -> None:
    src = Path(load_device("rpi4").path)
    copy = tmp_path / "mine.toml"
    copy.write_text(src.read_text())
    assert load_device(str(copy)).effective_gflops_fp32 == load_device("rpi4").effective_gflops_fp32
    with pytest.raises(ConfigError, match="does not exist"):
        load_device(str(tmp_path / "absent.toml"))


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


GOOD = """
name = "tiny"
description = "a test device"
effective_gflops_fp32 = 1.5
effective_gflops_int8 = 3
memory_mib = 64
max_onnx_opset = 17
execution_provider = "CPUExecutionProvider"
"""


def test_env_dir_and_malformed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(devices.ENV_DIR, str(tmp_path))
    _write(tmp_path, "tiny.toml", GOOD)
    _write(tmp_path, "links.toml", '[x]\ndescription = "d"\nuplink_mbps = 1\n'
                                   'downlink_mbps = 2\nrtt_ms = 0\n')
    assert devices.devices_dir() == tmp_path
    assert list_devices() == ["tiny"]
    assert load_device("tiny").sources == {}                # allowed, reported by missing_sources
    assert missing_sources(load_device("tiny")) == [
        "effective_gflops_fp32", "effective_gflops_int8", "memory_mib", "max_onnx_opset"]
    assert load_link("x").duty_cycle == 1.0 and load_link("x").max_payload_bytes is None

    bad = _write(tmp_path, "broken.toml", "name = \n")
    with pytest.raises(ConfigError) as exc:
        load_device("broken")
    assert str(bad) in str(exc.value) and "malformed TOML" in str(exc.value)

    _write(tmp_path, "nofield.toml", GOOD.replace("memory_mib = 64\n", ""))
    with pytest.raises(ConfigError, match=r"nofield\.toml: missing field memory_mib"):
        load_device("nofield")

    _write(tmp_path, "wrongtype.toml", GOOD.replace("= 1.5", '= "fast"'))
    with pytest.raises(ConfigError, match=r"wrongtype\.toml: field effective_gflops_fp32 must be"):
        load_device("wrongtype")

    _write(tmp_path, "negative.toml", GOOD.replace("= 1.5", "= -1.0"))
    with pytest.raises(ConfigError, match="effective_gflops_fp32"):
        load_device("negative")

    _write(tmp_path, "boolean.toml", GOOD.replace("memory_mib = 64", "memory_mib = true"))
    with pytest.raises(ConfigError, match="memory_mib must be an integer"):
        load_device("boolean")

    _write(tmp_path, "role.toml", GOOD + 'role = "cloud"\n')
    with pytest.raises(ConfigError, match="role must be one of client, server"):
        load_device("role")

    _write(tmp_path, "links.toml", '[y]\ndescription = "d"\nuplink_mbps = 1\n'
                                   'downlink_mbps = 2\nrtt_ms = 1\nduty_cycle = 2.0\n')
    with pytest.raises(ConfigError, match=r"y\.duty_cycle"):
        load_link("y")


def test_env_dir_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(devices.ENV_DIR, str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=devices.ENV_DIR):
        devices.devices_dir()
