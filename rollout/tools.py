"""Built-in tool environments for multi-turn rollouts (rollout/environment.py's protocol).

    rollout.environment: rollout.tools:Calculator     # <calculator>12 * (3 + 4)</calculator> -> 84
    rollout.environment: rollout.tools:PythonTool     # <python>print(sum(range(10)))</python> -> 45

The model calls a tool by writing its tag in a turn; the environment answers the last call of the turn as a
tool message, and the conversation goes on. A turn without a call is the model's final answer: the
conversation ends there and the run's reward functions score the whole conversation (rewards.functions),
which they receive as the completion, with each turn in the `turns` column ({completion, observation,
reward} per model turn the environment answered). The system message
says how to call the tool; a row's prompt (text) is the user message.

Calculator evaluates arithmetic only (numbers, + - * / // % **, parentheses; no names, no calls), through
Python's parser, never eval. PythonTool runs the code in rewards/sandbox.py's confined subprocess (no network,
read-only file system, CPU/memory/time limits; it needs root, as the code reward does) and answers with what it
printed.
"""

from __future__ import annotations

import ast
import operator
import re

CALCULATOR_SYSTEM = ("You can use a calculator. To compute something, write <calculator>expression</calculator>, "
                     "for example <calculator>12 * (3 + 4)</calculator>, and wait for the result. When you know "
                     "the answer, give it without calling the calculator.")
PYTHON_SYSTEM = ("You can run Python. To run code, write <python>code</python>; what it prints comes back to you. "
                 "When you know the answer, give it without running code.")

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
MAX_EXPONENT = 64  # 2 ** 64 is fine; 9 ** 9 ** 9 would not finish
MAX_BITS = 4096  # integers past this are refused: nested powers would otherwise take the machine's memory
MAX_EXPRESSION = 200  # characters


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text, or 'error: ...' saying why there is none."""
    if len(expression) > MAX_EXPRESSION:
        return f"error: expression longer than {MAX_EXPRESSION} characters"
    try:
        value = _value(ast.parse(expression.strip(), mode="eval").body)
    except SyntaxError:
        return "error: not an arithmetic expression"
    except ZeroDivisionError:
        return "error: division by zero"
    except (ValueError, OverflowError) as e:
        return f"error: {e}"
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


def _value(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent larger than {MAX_EXPONENT}")
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and left.bit_length() * abs(right) > MAX_BITS:
            raise ValueError(f"a number larger than 2 ** {MAX_BITS}")
        value = _OPS[type(node.op)](left, right)
        if isinstance(value, complex):  # a negative number to a fractional power
            raise ValueError("the result is not a real number")
        if isinstance(value, int) and value.bit_length() > MAX_BITS:
            raise ValueError(f"a number larger than 2 ** {MAX_BITS}")
        return value
    raise ValueError("only numbers, + - * / // % ** and parentheses are allowed")


def _last_call(tag: str, text: str) -> str | None:
    calls = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return calls[-1] if calls else None


def _opening(row: dict, system: str) -> list[dict]:
    prompt = row.get("prompt")
    if isinstance(prompt, list):  # chat messages: the tool's instructions go first
        return [{"role": "system", "content": system}] + [m for m in prompt if m.get("role") != "system"]
    if not isinstance(prompt, str):
        raise ValueError(f"the row's prompt must be text or chat messages, got {type(prompt).__name__}")
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


class Calculator:
    """Arithmetic with a calculator tool: `<calculator>expression</calculator>` -> its value."""

    def reset(self, row: dict) -> list[dict]:
        return _opening(row, CALCULATOR_SYSTEM)

    def step(self, completion_text: str) -> tuple[str | None, float | None, bool]:
        expression = _last_call("calculator", completion_text)
        if expression is None:
            return None, None, True
        return calculate(expression), None, False


class PythonTool:
    """Python in the sandbox: `<python>code</python>` -> what it printed (and the error's last line, if any)."""

    max_output = 1000  # characters of output given back to the model
    wall_s = 5.0

    def __init__(self):
        from rewards.sandbox import sandbox_unavailable

        reason = sandbox_unavailable()
        if reason is not None:
            raise RuntimeError(f"PythonTool needs the sandbox, which cannot run here: {reason}")

    def reset(self, row: dict) -> list[dict]:
        return _opening(row, PYTHON_SYSTEM)

    def step(self, completion_text: str) -> tuple[str | None, float | None, bool]:
        from rewards.sandbox import Limits, run_sandboxed

        code = _last_call("python", completion_text)
        if code is None:
            return None, None, True
        result = run_sandboxed(code, Limits(wall_s=self.wall_s, cpu_s=int(self.wall_s)))
        if result.timed_out:
            return f"error: timed out after {self.wall_s:g} s", None, False
        out = result.stdout
        if result.returncode not in (0, None):
            lines = result.stderr.strip().splitlines()
            out += f"\nerror: {lines[-1] if lines else f'exit code {result.returncode}'}"
        out = out.strip() or "(no output)"
        return out[:self.max_output], None, False
