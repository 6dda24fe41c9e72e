from cifar_dist.logging.sinks import ConsoleSink, JsonlSink, MultiSink, NullSink, Sink, build_sinks

__all__ = ["ConsoleSink", "JsonlSink", "MultiSink", "NullSink", "Sink", "build_sinks"]
