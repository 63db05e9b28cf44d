"""Converting a GGUF file parses it once: transformers asks for it three times (config, tokenizer, weights)."""

from __future__ import annotations


def test_a_gguf_file_is_parsed_once_while_converting(smollm2_gguf):
    import gguf

    from tunestack.model.builtin import gguf_parsed_once

    original = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        first = gguf.GGUFReader(smollm2_gguf)
        assert gguf.GGUFReader(str(smollm2_gguf)) is first
        assert len(first.tensors) == 272
        llama = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(llama, 30) is gguf.get_tensor_name_map(llama, 30)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == original  # restored: nothing stays cached after
