"""Luma's public Dream Machine API (/dream-machine/v1) on dreamq's jobs, so Luma's official
clients (`lumaai` for Python and TypeScript) work against dreamq by changing the base URL.

    requests.py     what the clients send, validated (422) and mapped onto dreamq job fields
    models.py       the admin-editable table of model names (`ray-2` -> a dreamq model)
    generations.py  the generation object the clients parse: states, assets, the original request

The HTTP layer is app/api/dream_machine.py; below it everything is dreamq's own: create_job, the
scheduler and workers, the cancel path, uploads' rules and the webhook machinery.
"""
