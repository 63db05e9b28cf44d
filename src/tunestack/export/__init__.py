"""`tunestack export`: a trained model as GGUF (llama.cpp, Ollama, LM Studio) or as a standalone safetensors folder.

gguf_arch.py     HF architecture -> GGUF architecture: hyperparameter metadata and tensors (names, Q/K permutation,
                 Llama-3 `rope_freqs`)
gguf_vocab.py    the tokenizer as GGUF metadata (byte-level BPE with its pre-tokenizer name, or SentencePiece)
gguf_writer.py   tensor types per quantization, the streamed write, and the read-back check
ollama.py        the Modelfile: FROM, a TEMPLATE in Ollama's Go template syntax, SYSTEM, stop parameters
outputs.py       the export manifest (which files an export wrote) and atomic replacement of them
safetensors.py   the standalone merged / re-sharded safetensors folder
command.py       the command line
"""
