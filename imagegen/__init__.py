"""imagegen-pipeline: image generation served through Kafka.

The packages, bottom layer first; each imports only from the layers below it
(`tests/test_layers.py` checks):

- `imagegen.schemas`: the wire contract: models, codec, errors, topic and header names;
- `imagegen.infra`: settings, Kafka clients, the object store, metrics, the embedded stack;
- `imagegen.producers`, `imagegen.processors`, `imagegen.consumers`: the publishing client, the
  faust intake app, the render worker and the tools that consume; none imports another;
- `imagegen.cli`: the `imagegen` command line and the demo, which put the rest together.

Importing this package imports nothing, so `import imagegen.producers` costs only the publisher.
"""
