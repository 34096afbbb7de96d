"""Moving models between BinaryLM and the rest of the ecosystem.

    hf.py        Hugging Face transformers directories (GPT-2 and Llama families), both ways
    gguf.py      GGUF files for llama.cpp, with the tokenizer embedded
    families.py  which outside architecture a BinaryLM config corresponds to
"""
