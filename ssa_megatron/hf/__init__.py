"""The standalone Hugging Face SSA model: exactly the files copied into exported directories.

They import only torch and transformers. Converters (export, Megatron bridge, Llama import) live in
``ssa_megatron.convert``.
"""
