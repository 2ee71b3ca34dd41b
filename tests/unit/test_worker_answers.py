"""What a worker keeps to answer a repeated question: recent answers, questions being worked on, and nothing more
per request served (a service runs thousands a day)."""

from __future__ import annotations

from engine.worker.worker import ANSWER_KEPT_S, ANSWERS_KEPT, Answers


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_answers_do_not_grow_with_the_requests_served():
    clock = Clock()
    answers = Answers(clock)
    for request in range(20 * ANSWERS_KEPT):
        clock.now += 1.0  # a request a second
        answers.remember((f"r{request}", 0, 0), "done")
    assert len(answers) == max(ANSWERS_KEPT, int(ANSWER_KEPT_S))
    assert len(answers._given) == len(answers)
    assert (f"r{20 * ANSWERS_KEPT - 1}", 0, 0) in answers and ("r0", 0, 0) not in answers


def test_recent_answers_and_questions_being_worked_on_stay():
    clock = Clock()
    answers = Answers(clock)
    answers.remember("long job", None)  # being worked on for longer than any answer is kept
    for request in range(3 * ANSWERS_KEPT):  # a burst: all within the time answers are kept
        answers.remember(request, "done")
    assert len(answers) == 3 * ANSWERS_KEPT + 1
    clock.now += ANSWER_KEPT_S + 1
    answers.remember("next", "done")
    assert answers["long job"] is None and len(answers) == ANSWERS_KEPT + 1
    answers.remember("long job", "its answer")  # answered at last: kept like any other
    assert next(reversed(answers)) == "long job"
