"""One parser and one name for an edit, everywhere."""

import pytest

from p2pz.teacher.edits import Edit, parse_edit
from p2pz.utils.errors import UserError


def test_an_edit_is_written_source_colon_target_and_named_source_to_target():
    edit = parse_edit(" cat : cat wearing a hat ")
    assert edit == Edit("cat", "cat wearing a hat")
    assert edit.name == "cat-to-cat_wearing_a_hat"
    assert edit.spec == "cat:cat wearing a hat"
    assert parse_edit("circle-to-square") == parse_edit("circle:square") == Edit("circle", "square")
    assert parse_edit(parse_edit("red:blue").name) == Edit("red", "blue")  # a name reads back


@pytest.mark.parametrize("bad", ["cat", "cat:", ":dog", "cat:dog:fox", "cat:CAT", "circle-square", ""])
def test_a_malformed_edit_is_one_line_error(bad):
    with pytest.raises(UserError, match="SOURCE:TARGET|changes nothing"):
        parse_edit(bad)
