import open_clip

from dct_audit.clip_vocab import clip_tokenizer


def test_tokenizer_matches_open_clip_ids():
    ours = clip_tokenizer()
    ref = open_clip.get_tokenizer("ViT-B-32")
    assert len(ours) == 49408
    for text in [
        "A photo of an American lobster on a plate",
        "a gymnast on a horizontal bar!",
        "snow, water & grass",
    ]:
        ids = ours(text).input_ids
        ref_ids = [int(i) for i in ref([text])[0] if int(i) != 0]
        assert ids == ref_ids
