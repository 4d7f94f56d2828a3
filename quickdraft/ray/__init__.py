"""quickdraft on Ray (the `ray` extra): offline batches on Ray Data (`build_processor`) and
replicated OpenAI-compatible serving on Ray Serve (`build_serve_app`, `quickdraft serve --ray`)."""

from quickdraft.ray.batch import BatchSummary, LLMReplica, Processor, ProcessorConfig, build_processor, summarize

__all__ = ["BatchSummary", "LLMReplica", "Processor", "ProcessorConfig", "build_processor", "build_serve_app",
           "summarize"]


def __getattr__(name: str):  # Serve is imported only when asked for
    if name == "build_serve_app":
        from quickdraft.ray.serve import build_serve_app

        return build_serve_app
    raise AttributeError(name)
