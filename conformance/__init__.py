"""`stepstream conformance`: checks any orchestrator, or any broadcaster, against spec/.

Built on protocol/ alone (codec, connection state machine, ticket math,
sender), never on orchestrator/: it tests other people's nodes, so it must
not share the reference orchestrator's code. spec/CONFORMANCE.md says how to
run it and what each verdict means.
"""
