import pytest

from dct_audit.adapters.classifier import LabelSet, describe_classifier, read_labels_file
from dct_audit.errors import DctAuditError
from dct_audit.resolve import resolve_classes


@pytest.fixture(scope="module")
def imagenet():
    return LabelSet.imagenet()


def test_headline_classes_resolve(imagenet):
    classes, notes = resolve_classes("lobster,horizontal_bar", imagenet)
    assert [(c.index, c.name) for c in classes] == [
        (122, "American lobster"),
        (123, "spiny lobster"),
        (602, "horizontal bar"),
    ]
    assert len(notes) == 1 and "American lobster (122)" in notes[0] and "spiny lobster (123)" in notes[0]


def test_index_full_name_and_case(imagenet):
    classes, notes = resolve_classes(["122", "SPINY LOBSTER", "high_bar"], imagenet)
    assert [c.index for c in classes] == [122, 123, 602]
    assert notes == []


def test_punctuation_and_accents_do_not_matter(imagenet, tmp_path):
    classes, notes = resolve_classes("jack o lantern,potters_wheel,Spider-Web,yellow ladys slipper", imagenet)
    assert [c.index for c in classes] == [607, 739, 815, 986] and notes == []
    labels = tmp_path / "labels.txt"
    labels.write_text("Café\nnaïve bayes\ncafeteria\n", encoding="utf-8")
    mine = read_labels_file(str(labels))
    assert [c.index for c in resolve_classes("cafe,NAIVE", mine)[0]] == [0, 1]
    assert [c.index for c in resolve_classes("café", mine)[0]] == [0]


def test_exact_name_shared_by_two_classes(imagenet):
    classes, _ = resolve_classes("crane", imagenet)
    assert [c.index for c in classes] == [134, 517]


def test_duplicates_are_audited_once(imagenet):
    classes, _ = resolve_classes("122,American lobster,lobster", imagenet)
    assert [c.index for c in classes] == [122, 123]


def test_typo_lists_closest_names(imagenet):
    with pytest.raises(DctAuditError, match=r"no class matches 'lobstr'.*lobster \(12[23]\)"):
        resolve_classes("lobstr", imagenet)


def test_index_out_of_range(imagenet):
    with pytest.raises(DctAuditError, match="out of range"):
        resolve_classes("1000", imagenet)
    # a negative index is out of range too, not class 1 (normalising the hyphen away once audited goldfish)
    with pytest.raises(DctAuditError, match="class index -1 is out of range"):
        resolve_classes("-1", imagenet)
    assert resolve_classes(" +7 ", imagenet)[0][0].index == 7


def test_fragment_matches_several_classes(imagenet):
    classes, notes = resolve_classes("dog", imagenet)
    assert 5 < len(classes) <= 25 and all(
        "dog" in " ".join(imagenet.synonyms[c.index]).lower() for c in classes
    )
    assert "auditing all of them" in notes[0]


def test_too_broad_fragment():
    labels = LabelSet.from_lines([f"red thing {i}" for i in range(30)], source="test")
    with pytest.raises(DctAuditError, match="matches 30 classes.*be more specific"):
        resolve_classes("thing", labels)


def test_empty_item(imagenet):
    with pytest.raises(DctAuditError, match="empty item"):
        resolve_classes("lobster,,", imagenet)


def test_timm_labels_come_without_weights():
    record, labels = describe_classifier("resnet50")
    assert record.kind == "timm" and len(labels) == 1000
    assert labels.names[122] == "American lobster" and "ImageNetInfo" in labels.source


def test_torchvision_and_tagged_timm_names_resolve():
    rec, labels = describe_classifier("tv:resnet50.IMAGENET1K_V2")
    assert rec.kind == "torchvision" and labels.names[602] == "horizontal bar"
    rec, labels = describe_classifier("vit_base_patch16_224.augreg_in21k_ft_in1k")
    assert rec.weights == "augreg_in21k_ft_in1k" and len(labels) == 1000


def test_labels_file_synonyms(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("red star, star\nblue ring\n\n")
    labels = read_labels_file(f)
    assert labels.names == ("red star", "blue ring")
    classes, _ = resolve_classes("star", labels)
    assert [c.index for c in classes] == [0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet5", "did you mean"),
        ("tv:resnet_nope", "unknown torchvision"),
        ("tv:resnet50.NOPE", "no weights 'NOPE'"),
        ("file:/nonexistent/model.pt", "does not exist"),
        ("", "empty"),
    ],
)
def test_bad_classifier_specs(spec, message):
    with pytest.raises(DctAuditError, match=message):
        describe_classifier(spec, labels_file=None)
