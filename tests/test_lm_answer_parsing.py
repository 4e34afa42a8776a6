"""The exact edges of the answer parsers the graders share: the arithmetic grammar's limits and its
refusals (one message each), which number `read_number` reads from an answer, and where the answer
of a tagged completion is."""

from __future__ import annotations

from fractions import Fraction

import pytest

from dipod.lm.tasks import get_task
from dipod.lm.tasks.arithmetic import MAX_CHARS, MAX_DEPTH, MAX_MAGNITUDE, ExpressionError, evaluate, parse_expression
from dipod.lm.tasks.plain_math import MAX_NUMBER_DIGITS, read_number


def value(text: str) -> Fraction:
    return evaluate(parse_expression(text))


def test_the_grammar_limits_are_inclusive():
    longest = "1+" * 99 + "11"
    assert len(longest) == MAX_CHARS == 200 and value(longest) == 110
    assert value("(" * MAX_DEPTH + "7" + ")" * MAX_DEPTH) == 7
    assert value("1000*1000*1000*1000") == MAX_MAGNITUDE  # numerator at the bound (literals have <= 6 digits)
    assert value("(0-1000)*1000*1000*1000") == -MAX_MAGNITUDE
    assert value("1/1000/1000/1000/1000") == Fraction(1, MAX_MAGNITUDE)  # denominator at the bound
    assert value("999999") == 999999  # six digits
    assert value("5/1") == 5 and value("(0-3)/1") == -3  # dividing by one is not dividing by zero


@pytest.mark.parametrize("text, message", [
    ("1+" * 100 + "1", "expression longer than 200 characters"),
    ("1+", "expression ends too early"),
    ("(" * (MAX_DEPTH + 1) + "7" + ")" * (MAX_DEPTH + 1), "parentheses nested deeper than 32"),
    ("(1+2", "expression ends too early"),
    ("(1+2 3", "missing ')'"),
    ("1+*2", "expected a number or '(', got '*'"),
    ("4/(2-2)", "division by zero"),
    ("1000*1000*1000*1001", f"intermediate result beyond {MAX_MAGNITUDE}"),
    ("(0-1000)*1000*1000*1001", f"intermediate result beyond {MAX_MAGNITUDE}"),
    ("1/1000/1000/1000/1001", f"intermediate result beyond {MAX_MAGNITUDE}"),
    ("1234567", "number with more than 6 digits"),
    ("3X", "unexpected character 'X'"),
    (" \t\n", "empty expression"),
    ("1 2", "unexpected '2' after a complete expression"),
    ("X3", "unexpected character 'X'"),
])
def test_each_refusal_is_one_message(text, message):
    with pytest.raises(ExpressionError) as refused:
        value(text)
    assert str(refused.value) == message


@pytest.mark.parametrize("text, expected", [
    ("x = 3 = 5", Fraction(5)),  # the part after the LAST '='
    ("x = 1/2 = 3/6", Fraction(1, 2)),
    ("3/4.", Fraction(3, 4)),  # a closing full stop is not part of the fraction
    ("The answer is 12.", Fraction(12)),  # a closing full stop is not a decimal point
    ("12. 5", Fraction(5)),
    (".5", Fraction(5)),  # only a trailing '.' is dropped; a leading one is not a number's
    ("(3)/(4)", Fraction(3, 4)),
    ("-3/4", Fraction(-3, 4)),
    ("6/2/3", Fraction(3)),  # not one fraction: the last number
    ("3/4X", Fraction(4)),  # only a full stop is dropped: with a letter after it, not one fraction either
])
def test_read_number_reads_the_number_an_answer_states(text, expected):
    assert read_number(text) == expected


def test_pick_first_or_last_number():
    assert read_number("between 3 and 8 apples", pick="first") == 3
    assert read_number("x = 1 = between 3 and 8", pick="first") == 3  # after the last '=' 
    assert read_number("between 3 and 8 apples") == read_number("between 3 and 8 apples", pick="last") == 8


@pytest.mark.parametrize("token", ["-" + "9" * MAX_NUMBER_DIGITS, "9" * (MAX_NUMBER_DIGITS - 2) + ".25",
                                   "-" + "9" * (MAX_NUMBER_DIGITS - 1) + ".5"])
def test_a_number_of_up_to_40_digits_is_read_whatever_its_sign_and_point(token):
    assert read_number(token) == Fraction(token)


def test_a_longer_number_is_garbage():
    assert read_number("9" * (MAX_NUMBER_DIGITS + 1)) is None
    assert read_number("1" * (MAX_NUMBER_DIGITS + 1) + "/3") is None


def test_the_last_complete_answer_pair_is_the_tagged_answer():
    from dipod.lm.tasks.answer_format import answer_text, tagged_answer

    assert tagged_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert tagged_answer("<answer>1<answer>2</answer>") == "2"  # the opening tag nearest the close
    assert tagged_answer("</answer><answer>3") is None
    assert answer_text("<reasoning>r</reasoning><answer> 5 </answer> and more") == "5"
    assert answer_text("just 5 <|eot_id|> 7") == "just 5"  # no tag: the whole text before EOS


def test_a_box_followed_only_by_spaces_holds_nothing():
    from dipod.lm.tasks.answer_format import last_boxed

    assert last_boxed("\\boxed   ") is None and last_boxed("\\boxed") is None
    assert last_boxed("\\boxed  7.") == "7"
    assert last_boxed("\\boxedsymbol") is None  # another command whose name starts like a box
    assert last_boxed("\\boxed 5 big apples") == "5"  # a box without braces holds one token
    assert last_boxed("\\boxed X") == "X"  # only a closing '$' or '.' is dropped from that token


def test_xml_count_charges_each_character_after_the_closing_answer_tag_but_the_first():
    from dipod.lm.tasks.answer_format import xml_count

    tidy = "<reasoning>\nr\n</reasoning>\n<answer>\n1\n</answer>"
    assert xml_count(tidy) == xml_count(tidy + "\n") == 1.0
    assert xml_count(tidy + "\n" + "x" * 50) == pytest.approx(1.0 - 0.002 * 50)
    assert xml_count(tidy + "\n" + "x" * 1000) == 0.0  # floored
    assert xml_count("<reasoning>\nr") == 0.25


def test_plain_math_unwraps_text_commands_keeping_only_their_words():
    from dipod.lm.tasks.plain_math import plain_math

    assert plain_math("12\\text{ cm}").split() == ["12", "cm"]
    assert plain_math("\\mathrm{kg}\\textbf{total}").split() == ["kg", "total"]


@pytest.mark.parametrize("text, exponents", [
    ("x^ {2}+1", [("{2}", "+1", False)]),  # spaces after the caret, then a brace group
    ("x^{a_{1}}+2", [("{a_{1}}", "+2", False)]),  # the group ends at its own closing brace
    ("(x+1)^10 y", [("10", "y", True)]),  # a token, on a bracketed base
    ("(x+1) ^2", [("2", "", True)]),  # the base is the last character before the caret's spaces
    ("2^\\pi", [("\\pi", "", False)]),
    ("x^", [("", "", False)]), ("x^ ", [("", "", False)]),  # a caret at the end holds nothing
])
def test_math500_reads_each_exponent_its_base_and_what_follows(text, exponents):
    from dipod.lm.tasks.math500 import _exponents

    assert _exponents(text) == exponents


@pytest.mark.parametrize("answer, cheap", [
    ("(1" * 10 + ")" * 10, True), ("(1" * 11 + ")" * 11, False),  # nesting counts every bracket kind
    ("[{(" * 3 + "1" + ")}]" * 3 + "+(((((((((((1)))))))))))", False),
    ("()" * 5 + "(" * 11, False),  # a closed pair does not make room for deeper nesting
    ("X" * 11, True), ("X" * 5 + "(" * 11 + ")" * 11, False),  # letters are not brackets
    ("x^{0000001}", False), ("x^{000002}", True),  # exponent digits: 6 at most, whatever their value
])
def test_math500_cheap_to_verify_counts_brackets_and_exponent_digits(answer, cheap):
    from dipod.lm.tasks.math500 import cheap_to_verify

    assert cheap_to_verify(answer) is cheap


@pytest.mark.parametrize("spelling", ["\\left(1,2\\right)", "\\dfrac{1}{2}", "\\tfrac{1}{2}", "1\\!000", "1\\,000",
                                      "1\\;000", " 1 000 ", "1\n000", "1000."])
def test_math500_canonical_form_drops_spacing_and_sizing_spellings(spelling):
    from dipod.lm.tasks.math500 import _canonical

    expected = {"\\left(1,2\\right)": "(1,2)", "\\dfrac{1}{2}": "\\frac{1}{2}", "\\tfrac{1}{2}": "\\frac{1}{2}"}
    assert _canonical(spelling) == expected.get(spelling, "1000")
    assert _canonical("2X.") == "2X"  # only the closing full stop goes


@pytest.mark.parametrize("completion, region", [
    ("<answer>1</answer> <answer>2</answer>", "2"),  # the last opening tag
    ("<answer>2</answer> then </answer>", "2"),  # up to the next closing tag
    ("<answer></answer>", ""),
    ("5</answer> and 6</answer>", "5</answer> and 6"),  # no opening tag: before the LAST closing tag
    ("</answer> 5", ""),
    ("</reasoning> a </reasoning> 7</answer>", "7"),  # after the last </reasoning>
    ("</reasoning>7</answer>", "7"),
    ("the answer is 7</answer>", "the answer is 7"),
])
def test_the_answer_region_of_tagged_text(completion, region):
    from dipod.lm.tasks.answer_format import answer_region

    assert answer_region(completion) == region


def test_text_ends_at_the_first_end_of_sequence_marker_of_any_kind():
    from dipod.lm.tasks.answer_format import before_eos

    assert before_eos("a<|eot_id|>b</s>c") == before_eos("a</s>b<|eot_id|>c") == "a"
    assert before_eos("a<|eot_id|>b<|eot_id|>c") == "a" and before_eos("no marker") == "no marker"


def test_an_empty_math_answer_is_no_answer():
    assert get_task("math500").extract_answer("<answer> </answer>") is None
