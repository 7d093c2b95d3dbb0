"""A checkpoint in several safetensors files, as Hugging Face ships models over ~5 GB: a reader opens
only the files holding the tensors it reads, and two ranks generate transformers' greedy tokens."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import llmd_here, make_tiny_model
from llmd.engine.checkpoint import INDEX_FILE, SliceReader, model_name, resolve_model, weight_files
from llmd.engine.errors import ModelNotFound
from reference import hf_greedy

SHARD = "200KB"  # the tiny model's layers are ~100 KB each: six files, a layer across one or two
PROMPT = "The three primary colours of light are"


@pytest.fixture(scope="module")
def whole(tmp_path_factory, default_model_dir):
    return make_tiny_model("llama-gqa", tmp_path_factory.mktemp("whole"), default_model_dir)


@pytest.fixture(scope="module")
def sharded(whole, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(whole, dtype=torch.float32).save_pretrained(out, max_shard_size=SHARD)
    AutoTokenizer.from_pretrained(whole).save_pretrained(out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    return out


def index_map(model_dir) -> dict[str, str]:
    return json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]


def test_a_reader_opens_only_the_files_holding_the_tensors_it_reads(sharded, whole):
    where = index_map(sharded)
    layer = [name for name in where if name.startswith("model.layers.1.")]
    with SliceReader(sharded) as r, SliceReader(whole) as ref:
        assert r.has(layer[0]) and not r.has("model.layers.9.mlp.up_proj.weight")
        assert r.opened == []  # asking what there is opens nothing
        for name in layer:
            assert torch.equal(r.whole(name), ref.whole(name))
        assert sorted(r.opened) == sorted({where[name] for name in layer})
        assert where["model.embed_tokens.weight"] not in r.opened and where["lm_head.weight"] not in r.opened
        q = "model.layers.1.self_attn.q_proj.weight"
        assert torch.equal(r.rows(q, [(0, 16), (48, 64)]), ref.rows(q, [(0, 16), (48, 64)]))
        assert torch.equal(r.cols(q, [(8, 24)]), ref.cols(q, [(8, 24)]))


def test_without_an_index_the_files_headers_say_where_each_tensor_is(sharded, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(sharded, bare, ignore=shutil.ignore_patterns(INDEX_FILE))
    assert weight_files(bare) == index_map(sharded)
    with SliceReader(bare) as r:
        r.whole("model.norm.weight")
        assert r.opened == [index_map(sharded)["model.norm.weight"]]


def test_a_directory_missing_a_file_its_index_names_is_refused(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    lost = index_map(sharded)["model.layers.2.mlp.up_proj.weight"]
    (broken / lost).unlink()
    assert resolve_model(str(sharded)) == sharded
    with pytest.raises(ModelNotFound, match=lost):
        resolve_model(str(broken))


def test_two_ranks_generate_transformers_greedy_tokens_from_a_sharded_checkpoint(sharded):
    out = llmd_here("generate", "--model", str(sharded), "--workers", "2", "--greedy", "--max-new-tokens", "16",
                    "--compile", "off", "--weights", "fp32", "--json", PROMPT).json
    assert len(out["plan"]["ranks"]) == 2
    assert out["token_ids"] == hf_greedy(sharded, out["prompt_token_ids"], 16)


def test_a_model_id_resolves_through_the_local_hugging_face_cache_only(whole, tmp_path, monkeypatch):
    """`--model org/name` is the cache's snapshot of it, as transformers lays the cache out; an id that is not
    there is a clear error naming the cache folder, and nothing is downloaded."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # were anything asked of a hub, it would fail
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(whole, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_model("tiny-org/tiny-llama") == repo / "snapshots" / commit
    assert model_name(resolve_model("tiny-org/tiny-llama")) == "tiny-org/tiny-llama"  # what the API lists
    with pytest.raises(ModelNotFound, match=f"not in the Hugging Face cache at {tmp_path / 'hub'}"):
        resolve_model("tiny-org/absent-model")
