"""Vision-language RL (Qwen2-VL / Qwen2.5-VL): Visual-RFT, CLS-RL, chart-to-code. Not built yet (issue 3)."""
