"""Files: the safetensors codec (``safetensors``) and writer (``shards``), source checkpoints (safetensors, guarded pickle,
GGUF), Hugging Face directory helpers, the factored format, atomic locked outputs, versioned JSON.

Imports nothing else of moorize but ``errors``: every other stage reads and writes through it."""
