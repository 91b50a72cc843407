"""Celery side: the app and its queues (celery_app), and the tasks (dispatch, generate, finalize)."""
