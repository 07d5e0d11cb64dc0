"""The HTTP contract: request and response bodies, one module per router (`openai`,
`lorax`, `adapters`, `jobs`, `files`, `admin`, `ops`), and `common` for what several share.

No field is silently ignored: an answer that dropped `logit_bias` or `response_format`
would look right and not be. A field this server does not know is a 400 naming it
(pydantic's `extra="forbid"`); a known field set to a value this server does not
implement is a 400 naming it too (`common.not_supported`); `errors.py` maps both.

Types are checked here (a wrong type is a 422); value ranges are the engine's
(`SamplingParams.validate`), checked once there and reported as a 400. Model names are
part of the contract: the console builds its job form from the OpenAPI schema.
"""
