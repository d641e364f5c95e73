"""What LLaMA-Factory does with an exported dataset, re-implemented for the export tests.

Read from hiyouga/LLaMA-Factory at ff6d4d1 (2026-08-18), not imported (it pins its own
transformers and peft, and is not a dependency):

- `data/parser.py` `DatasetAttr`: the columns and tags `dataset_info.json` may set, and
  their defaults;
- `data/converter.py` `SharegptDatasetConverter` and `AlpacaDatasetConverter`: a sharegpt
  record's turns must alternate `human`/`observation` (odd positions) and `gpt`/`function_call`
  (even positions) and be even in number, else the record is "abnormal" and skipped;
- `data/processor/supervised.py`: a converted example is dropped unless its prompt has an
  odd number of messages and its response exactly one;
- `data/template.py`, template `chatglm3`, with `Template._encode` and
  `_convert_elements_to_ids`: each string slot encoded on its own with
  `tokenizer.encode(slot, add_special_tokens=False)` (for ChatGLM3's tokenizer, a plain
  sentencepiece encode with its dummy prefix), each `{"token": ...}` slot as that id, and,
  since `efficient_eos` is set, one `</s>` after the last answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from yanray.engine.chatglm3.tokenizer import EOS, SPECIAL_IDS, ChatGLM3Tokenizer

SHAREGPT_DEFAULTS = {
    "messages": "conversations",
    "system": None,
    "tools": None,
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
ALPACA_DEFAULTS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "system": None,
}


def attributes(entry: Mapping[str, Any]) -> dict[str, Any]:
    """`DatasetAttr.join`: the defaults, then the entry's columns and tags."""
    formatting = entry.get("formatting", "alpaca")
    attr = dict(SHAREGPT_DEFAULTS if formatting == "sharegpt" else ALPACA_DEFAULTS)
    attr.update(entry.get("columns", {}))
    attr.update(entry.get("tags", {}))
    attr["formatting"] = formatting
    return attr


def convert_sharegpt(attr: Mapping[str, Any], example: Mapping[str, Any]) -> dict[str, Any] | None:
    """`SharegptDatasetConverter.__call__` (not ranking, not KTO); None where it skips the example."""
    mapping = {
        attr["user_tag"]: "user",
        attr["assistant_tag"]: "assistant",
        attr["observation_tag"]: "observation",
        attr["function_tag"]: "function",
        attr["system_tag"]: "system",
    }
    odd_tags = (attr["user_tag"], attr["observation_tag"])
    even_tags = (attr["assistant_tag"], attr["function_tag"])
    accept = (odd_tags, even_tags)
    messages = example[attr["messages"]]
    if attr["system_tag"] and messages and messages[0][attr["role_tag"]] == attr["system_tag"]:
        system = messages[0][attr["content_tag"]]
        messages = messages[1:]
    else:
        system = example[attr["system"]] if attr["system"] else ""
    aligned = []
    for index, message in enumerate(messages):
        if message[attr["role_tag"]] not in accept[index % 2]:
            return None
        aligned.append({"role": mapping[message[attr["role_tag"]]], "content": message[attr["content_tag"]]})
    if len(aligned) % 2 != 0:
        return None
    return {
        "_prompt": aligned[:-1],
        "_response": aligned[-1:],
        "_system": system,
        "_tools": example[attr["tools"]] if attr["tools"] else "",
    }


def convert_alpaca(attr: Mapping[str, Any], example: Mapping[str, Any]) -> dict[str, Any]:
    """`AlpacaDatasetConverter.__call__` (a normal example)."""
    prompt = []
    if attr["history"] and isinstance(example[attr["history"]], list):
        for old_prompt, old_response in example[attr["history"]]:
            prompt.append({"role": "user", "content": old_prompt})
            prompt.append({"role": "assistant", "content": old_response})
    query = [example[k] for k in (attr["prompt"], attr["query"]) if k and example[k]]
    prompt.append({"role": "user", "content": "\n".join(query)})
    response = [{"role": "assistant", "content": example[attr["response"]]}]
    return {
        "_prompt": prompt,
        "_response": response,
        "_system": example[attr["system"]] if attr["system"] else "",
        "_tools": "",
    }


def supervised_keeps(converted: Mapping[str, Any]) -> bool:
    """`SupervisedDatasetProcessor.preprocess_dataset`'s check."""
    return len(converted["_prompt"]) % 2 == 1 and len(converted["_response"]) == 1


def load(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Every entry of `folder/dataset_info.json`, converted as LLaMA-Factory would; raises on
    any record it would skip or drop."""
    info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    out: dict[str, list[dict[str, Any]]] = {}
    for name, entry in info.items():
        attr = attributes(entry)
        lines = (folder / entry["file_name"]).read_text(encoding="utf-8").splitlines()
        converted = []
        for number, line in enumerate(lines, start=1):
            example = json.loads(line)
            if attr["formatting"] == "sharegpt":
                result = convert_sharegpt(attr, example)
            else:
                result = convert_alpaca(attr, example)
            assert result is not None, f"{name} line {number}: LLaMA-Factory skips it as abnormal: {example}"
            assert supervised_keeps(result), f"{name} line {number}: LLaMA-Factory drops it: {example}"
            assert all(isinstance(m["content"], str) for m in result["_prompt"] + result["_response"])
            converted.append(result)
        out[name] = converted
    return out


# -- the chatglm3 template ---------------------------------------------------------------

Slot = str | dict[str, str]
CHATGLM3: dict[str, list[Slot]] = {
    "prefix": [{"token": "[gMASK]"}, {"token": "sop"}],
    "system": [{"token": "<|system|>"}, "\n", "{{content}}"],
    "user": [{"token": "<|user|>"}, "\n", "{{content}}", {"token": "<|assistant|>"}],
    "assistant": ["\n", "{{content}}"],
    "observation": [{"token": "<|observation|>"}, "\n", "{{content}}", {"token": "<|assistant|>"}],
}


def _apply(slots: Sequence[Slot], content: str) -> list[Slot]:
    return [slot.replace("{{content}}", content, 1) if isinstance(slot, str) else slot for slot in slots]


def chatglm3_elements(converted: Mapping[str, Any]) -> list[Slot]:
    """`Template._encode` for `chatglm3` over a converted example, all turns laid end to end."""
    messages = converted["_prompt"] + converted["_response"]
    system, tools = converted["_system"], converted["_tools"]
    assert not tools, "the export writes tools into the system text, never the tools column"
    elements: list[Slot] = []
    for index, message in enumerate(messages):
        if index == 0:
            elements += CHATGLM3["prefix"]
            if system:
                elements += _apply(CHATGLM3["system"], system)
        role = message["role"]
        if role == "function":
            raise AssertionError("the export writes no function_call turns (glm4 JSON is not Yanray's form)")
        elements += _apply(CHATGLM3[role], message["content"])
    return elements


def chatglm3_ids(converted: Mapping[str, Any], tokenizer: ChatGLM3Tokenizer) -> list[int]:
    """The ids LLaMA-Factory trains on for this example (`efficient_eos`: `</s>` at the end)."""
    ids: list[int] = []
    for element in chatglm3_elements(converted):
        if isinstance(element, dict):
            ids.append(SPECIAL_IDS[element["token"]])
        elif element:
            ids += tokenizer.encode_text(element)  # tokenizer.encode(element, add_special_tokens=False)
    return [*ids, EOS]
