"""Export of edited models: Hugging Face folders (weights, or weights plus a small modelling file for
artifacts that act through hooks) and GGUF files that llama.cpp and Ollama load."""
