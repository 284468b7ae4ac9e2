"""Vision-language evaluation: synthetic question-answering scenes (`scenes`), the chat prompt
with image tokens (`prompt`), and the benchmarks built on them."""
