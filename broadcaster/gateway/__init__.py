"""The gateway: the Livepeer AI REST API and live job streams over HTTP, for apps.

Apps talk HTTP to the gateway; the gateway talks the stepstream protocol to
orchestrators through `BroadcasterSession`, pays them, stores the outputs
and streams every job's events to whoever subscribes.
"""
