"""The OpenAI-compatible server, split as vLLM's ``entrypoints/openai/`` is.

- ``protocol``: request bodies (pydantic), with vLLM's extra fields;
- ``errors``: OpenAI's error JSON and the exceptions that become it;
- ``limits``: what one request may ask for and how many may wait (back-pressure);
- ``logprobs``: per-token text, bytes and the two logprob shapes;
- ``serving_engine``: what both endpoints share (prompts, sampling params, admission, results);
- ``serving_completion`` / ``serving_chat``: the two endpoints, streamed and not;
- ``api_server``: the FastAPI app, its middleware, and running it under uvicorn.
"""
