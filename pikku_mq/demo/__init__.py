"""The functions of ``pikku-mq demo``, one module per kind of worker.

``greeter`` hosts ``greet``, ``shouter`` hosts ``shout`` and ``concierge`` hosts ``welcome``, which
calls the other two remotely. Each result carries the process id of the instance that served it, so the
demo can show which instance served each hop. :mod:`pikku_mq.demo.runner` starts the workers and
drives the calls.
"""
