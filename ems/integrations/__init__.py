"""Integrations of EMS with inference engines (vLLM: ems.integrations.vllm)."""
