"""CNI request parsing, error codes and result formats, without any networking."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.agent.cni import protocol as cp

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
       "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=shop;IP=10.1.0.9"}


def conf(**over) -> bytes:
    c = {"cniVersion": "1.0.0", "name": "blue", "type": "tether"}
    c.update(over)
    return json.dumps({k: v for k, v in c.items() if v is not None}).encode()


def code_of(env: dict, stdin: bytes) -> int:
    with pytest.raises(cp.CniError) as e:
        cp.parse_request(env, stdin)
    assert e.value.msg  # always a message a person can act on
    return e.value.code


def test_a_good_add_parses_args_and_handle() -> None:
    req = cp.parse_request(ENV, conf())
    assert req.command == "ADD" and req.version == "1.0.0" and req.network == "blue"
    assert req.args["K8S_POD_NAME"] == "web" and req.args["IP"] == "10.1.0.9"
    assert req.handle == "abc123/eth0"
    assert cp.parse_request(ENV, conf(network="red")).network == "red"


@pytest.mark.parametrize(("env", "stdin", "code"), [
    ({**ENV, "CNI_COMMAND": "FROB"}, conf(), cp.INVALID_ENV),
    ({k: v for k, v in ENV.items() if k != "CNI_CONTAINERID"}, conf(), cp.INVALID_ENV),
    ({k: v for k, v in ENV.items() if k != "CNI_NETNS"}, conf(), cp.INVALID_ENV),
    ({k: v for k, v in ENV.items() if k != "CNI_IFNAME"}, conf(), cp.INVALID_ENV),
    ({**ENV, "CNI_IFNAME": "a-very-long-interface-name"}, conf(), cp.INVALID_ENV),
    ({**ENV, "CNI_ARGS": "novalue"}, conf(), cp.INVALID_ENV),
    (ENV, b"{not json", cp.DECODE_FAILURE),
    (ENV, b"[1, 2]", cp.DECODE_FAILURE),
    (ENV, conf(cniVersion="0.2.0"), cp.INCOMPATIBLE_VERSION),
    (ENV, conf(cniVersion=None), cp.INVALID_CONFIG),
    (ENV, conf(name=None), cp.INVALID_CONFIG),
    (ENV, conf(frobnicate=True), cp.UNSUPPORTED_FIELD),
    (ENV, conf(labels=["a"]), cp.INVALID_CONFIG),
    ({**ENV, "CNI_COMMAND": "CHECK"}, conf(), cp.INVALID_CONFIG),  # CHECK needs prevResult
    ({**ENV, "CNI_COMMAND": "STATUS"}, conf(), cp.INCOMPATIBLE_VERSION),  # STATUS is 1.1.0+
])
def test_bad_requests_get_the_spec_error_code(env: dict, stdin: bytes, code: int) -> None:
    assert code_of(env, stdin) == code


def test_unsupported_field_names_the_field() -> None:
    with pytest.raises(cp.CniError) as e:
        cp.parse_request(ENV, conf(frobnicate=True))
    assert "frobnicate" in e.value.msg


def test_version_without_config_lists_every_supported_version() -> None:
    req = cp.parse_request({"CNI_COMMAND": "VERSION"}, b"")
    body = json.loads(cp.version_json(req.version))
    assert {"0.3.1", "0.4.0", "1.0.0", "1.1.0"} <= set(body["supportedVersions"])


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_results_come_in_the_version_asked_for(version: str) -> None:
    a = cp.Attachment("tth1", "aa:bb:cc:dd:ee:01", "eth0", "aa:bb:cc:dd:ee:02", "/var/run/netns/x",
                      ["10.1.0.9"], "169.254.1.1", dns={"nameservers": ["169.254.2.1"]}, mtu=1450)
    r = cp.result(version, a)
    assert r["cniVersion"] == version
    assert r["ips"][0]["address"] == "10.1.0.9/32" and r["ips"][0]["interface"] == 1
    assert ("version" in r["ips"][0]) == version.startswith("0.")
    assert r["interfaces"][1]["sandbox"] == "/var/run/netns/x"
    assert r["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert r["dns"]["nameservers"] == ["169.254.2.1"]


def test_errors_are_json_with_code_and_msg() -> None:
    body = json.loads(cp.error_json("0.4.0", cp.CniError(7, "network 'x' does not exist")))
    assert body == {"cniVersion": "0.4.0", "code": 7, "msg": "network 'x' does not exist"}


def test_valid_attachments_for_gc() -> None:
    c = {"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}
    assert cp.valid_attachments(c) == {("a", "eth0")}
    with pytest.raises(cp.CniError):
        cp.valid_attachments({"cni.dev/valid-attachments": "a"})


@given(st.binary(max_size=200), st.dictionaries(st.sampled_from(list(ENV) + ["CNI_PATH"]), st.text(max_size=30)))
def test_any_input_gives_a_request_or_a_cni_error(stdin: bytes, env: dict) -> None:
    try:
        cp.parse_request(env, stdin)
    except cp.CniError as e:
        assert e.code in (1, 2, 3, 4, 5, 6, 7) and e.msg
