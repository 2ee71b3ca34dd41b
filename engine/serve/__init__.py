"""``engine serve``: one deployment of a graph kept warm, taking jobs over HTTP and MQTT; ``engine submit``, its
MQTT client.

    jobs.py       the jobs and their state, in SQLite under the service's state folder (a restart loses none)
    bodies.py     the API's request bodies (OpenAI-shaped) turned into the graph family's request
    service.py    the service: admission, the deployment's scheduler, job state, events, draining
    http.py       the HTTP API (FastAPI): /v1/videos, /v1/images/*, /v1/models, /health, /metrics
    api_errors.py errors in the API's shape, the body-size and bearer-token gates
    reading.py    a job's body read strictly (JSON, form fields, an uploaded image decoded to its last pixel)
    mqtt.py       job submission over MQTT (signed SubmitJob in, JobUpdate out)
    metrics.py    the Prometheus metrics
    page.py       the page at / (static files in page/) and the live feed it reads (/v1/service, its events)
    cli_serve.py  the command's arguments and start-up
    submit.py     ``engine submit``: the MQTT client of a service (sign, submit, follow, fetch the output)
    cli_submit.py its arguments, and where the broker, credentials and submit key come from
"""
