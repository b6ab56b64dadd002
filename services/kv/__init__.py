"""The KV library beneath the services: tensor views of every registered layout, frame
payloads, relayout between descriptors, and the KV-stream protocol with its transports.

It imports only `proto` (and third-party libraries): the engine, the workers, the converter
and the benchmarks build on it.
"""
