"""The vision-language side of RetinalGPT: the mini checkpoint, export in vLLM's layout."""
