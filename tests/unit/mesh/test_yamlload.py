"""Bounded YAML: the limits, the refusals, and where a syntax error is."""

from __future__ import annotations

import pytest

from mesh import ConfigError, yamlload
from mesh.yamlload import (
    MAX_DEPTH,
    MAX_DOCUMENTS,
    MAX_INPUT_BYTES,
    MAX_NODES,
    Document,
    load_documents,
)

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""

QUOTE_STARS = 'to write a value that starts with \'*\', quote it: "*", "*.example.com"'
NO_ANCHORS = (
    "YAML anchors and aliases (&name, *name) are not supported: write each value out "
    "(an alias can make a small file expand into a huge one)"
)


def refusal(text: str | bytes, source: str = "<stdin>") -> str:
    with pytest.raises(ConfigError) as caught:
        load_documents(text, source=source)
    assert len(caught.value.errors) == 1
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "kind: Gateway\nmetadata:\n  name: x\n spec: {}\n",
            "<stdin>: line 4, column 2: invalid YAML: did not find expected key (while parsing "
            "a block mapping)",
            id="bad-indentation",
        ),
        pytest.param(
            "key: value\n  other: x\n",
            "<stdin>: line 2, column 8: invalid YAML: mapping values are not allowed in this "
            "context",
            id="mapping-in-scalar",
        ),
        pytest.param(
            "hosts: [a, b\n",
            "<stdin>: line 2, column 1: invalid YAML: did not find expected ',' or ']' (while "
            "parsing a flow sequence)",
            id="unclosed-list",
        ),
        pytest.param(
            'name: "unterminated\n',
            "<stdin>: line 2, column 1: invalid YAML: found unexpected end of stream (while "
            "scanning a quoted scalar)",
            id="unterminated-string",
        ),
        pytest.param(
            "spec:\n\t- a\n",
            "<stdin>: line 2, column 1: invalid YAML: found character that cannot start any "
            "token (while scanning for the next token); a tab is not indentation in YAML: "
            "indent with spaces",
            id="tab",
        ),
        pytest.param(
            "a: !Secret x\n",
            "<stdin>: line 1, column 4: invalid YAML: could not determine a constructor for "
            "the tag '!Secret'",
            id="unknown-tag",
        ),
        pytest.param(
            'a: !!python/object/apply:os.system ["true"]\n',
            "<stdin>: line 1, column 4: invalid YAML: could not determine a constructor for "
            "the tag 'tag:yaml.org,2002:python/object/apply:os.system'",
            id="python-tag",
        ),
        pytest.param(
            BILLION_LAUGHS, f"<stdin>: line 1, column 4: {NO_ANCHORS}", id="billion-laughs"
        ),
        pytest.param(
            "a: *x\n", f"<stdin>: line 1, column 4: {NO_ANCHORS}; {QUOTE_STARS}", id="alias"
        ),
        pytest.param(
            "hosts: [*.example.com]\n",
            "<stdin>: line 1, column 10: invalid YAML: did not find expected alphabetic or "
            f"numeric character (while scanning an alias); {QUOTE_STARS}",
            id="unquoted-wildcard",
        ),
        pytest.param(
            "hosts:\n- *\n",
            "<stdin>: line 2, column 4: invalid YAML: did not find expected alphabetic or "
            f"numeric character (while scanning an alias); {QUOTE_STARS}",
            id="unquoted-star",
        ),
        pytest.param(
            "base: &base {a: 1}\n", f"<stdin>: line 1, column 7: {NO_ANCHORS}", id="anchor"
        ),
        pytest.param(
            "a: {x: 1}\nb:\n  <<: {y: 2}\n",
            "<stdin>: line 3, column 3: YAML merge keys (<<) are not supported",
            id="merge-key",
        ),
        pytest.param(
            "route: [a]\nname: x\nroute: [b]\n",
            "<stdin>: line 3, column 1: key 'route' appears twice in this mapping (first on "
            "line 1)",
            id="duplicate-key",
        ),
        pytest.param(
            "ports:\n  80: http\n",
            "<stdin>: line 2, column 3: a mapping key must be a string, not 80 (quote it)",
            id="integer-key",
        ),
        pytest.param(
            "a: !!int 0x10\n",
            "<stdin>: line 1, column 4: '0x10' is not a decimal integer",
            id="hex-int",
        ),
        pytest.param(
            "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
            f"<stdin>: line 1, column {MAX_DEPTH + 1}: nests deeper than 64 levels",
            id="too-deep",
        ),
        pytest.param(
            "[" * 100_000,
            "<stdin>: line 1, column 1001: invalid YAML: exceeded maximum nesting depth (while "
            "increasing flow level)",
            id="far-too-deep",
        ),
        pytest.param(
            b"name: caf\xe9\n",
            "<stdin> is not UTF-8 text (byte 0xe9 at offset 9)",
            id="latin-1",
        ),
    ],
)
def test_refused(text: str | bytes, expected: str) -> None:
    assert refusal(text) == expected


def test_a_10_mb_document_is_refused_naming_the_limit() -> None:
    text = "a: " + "x" * (10 * 1024 * 1024)
    assert refusal(text, source="big.yaml") == (
        "big.yaml is 10,485,763 bytes; at most 4,194,304 bytes (4 MiB) may be applied at "
        "once: split it into several files"
    )
    assert refusal(text.encode()).startswith("<stdin> is 10,485,763 bytes;")


def test_the_limit_counts_bytes_not_characters() -> None:
    text = "a: " + "é" * (MAX_INPUT_BYTES // 2)  # fewer characters than the limit, more bytes
    assert len(text) < MAX_INPUT_BYTES
    assert refusal(text).startswith("<stdin> is 4,194,307 bytes;")
    exactly = "a: " + "x" * (MAX_INPUT_BYTES - 3)
    assert load_documents(exactly)[0].content == {"a": "x" * (MAX_INPUT_BYTES - 3)}


def test_at_most_1000_documents() -> None:
    assert len(load_documents("---\na: 1\n" * MAX_DOCUMENTS)) == MAX_DOCUMENTS
    assert refusal("---\na: 1\n" * (MAX_DOCUMENTS + 1)) == (
        "<stdin> has more than 1,000 documents; apply at most 1,000 at once (split the file)"
    )


def test_a_bounded_number_of_values(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_NODES == 600_000
    monkeypatch.setattr(yamlload, "MAX_NODES", 1000)  # the same check, faster
    values = ",".join(["1"] * 997)  # with the mapping, its key and the list: 1,000
    assert len(load_documents(f"a: [{values}]\n")[0].content["a"]) == 997
    assert refusal(f"a: [{values},1]\n") == (
        "<stdin>: line 1, column 1999: has more than 1,000 values in all; apply fewer at "
        "once (split the file)"
    )


def test_empty_documents_are_skipped_and_counted() -> None:
    text = "---\na: 1\n---\n---\n# nothing\n---\nb: 2\n"
    assert load_documents(text) == [Document(1, 2, {"a": 1}), Document(4, 7, {"b": 2})]
    assert load_documents("") == []
    assert load_documents("---\n---\n") == []


def test_yaml_1_2_scalars() -> None:
    text = "a: [on, off, yes, no, true, False, 2024-01-01, 1:30, 080, -5, +3, 1.5, 0x10]\n"
    assert load_documents(text)[0].content == {
        "a": ["on", "off", "yes", "no", True, False, "2024-01-01", "1:30", 80, -5, 3, 1.5, "0x10"]
    }


def test_bytes_with_a_byte_order_mark() -> None:
    assert load_documents(b"\xef\xbb\xbfa: 1\n")[0].content == {"a": 1}
    assert load_documents("\ufeffa: 1\n")[0].content == {"a": 1}


def test_the_source_names_the_input() -> None:
    assert refusal("a: [\n", source="mesh.yaml").startswith("mesh.yaml: line 2, column 1:")
