"""Adapters that put the avatar into other real-time frameworks (Pipecat: `letstalk_rt.integrations.pipecat`)."""
