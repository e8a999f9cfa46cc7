"""`.scopefs/status` is JSON that a pipeline can read whatever the dataset
holds: a folder name that is not UTF-8 (Latin-1 from an old share) must not
make the whole document unreadable, and a stack left out of deconvolved/
says so in its own entry, as slides do, so a pipeline walking "stacks"
knows which folders exist."""
import io
import json
import os

import numpy as np
import tifffile

import gen


def write_planes(folder, volume):
    os.makedirs(folder, exist_ok=True)
    for z, plane in enumerate(volume):
        data = io.BytesIO()  # tifffile wants a str name; this one is bytes
        tifffile.imwrite(data, plane)
        with open(os.path.join(folder, b'img_%06d.tif' % z), 'wb') as f:
            f.write(data.getvalue())


def test_status_json_with_latin1_name_and_stack_states(scopefs):
    volume = gen.beads(4, 16, 16, seed=1)
    raw = os.fsencode(str(scopefs.raw))
    # 'lat\xe9' is 'laté' in Latin-1: not valid UTF-8
    latin1 = os.path.join(raw, b'Ex_561_Em_600_lat\xe9')
    write_planes(latin1, volume)
    write_planes(os.path.join(raw, b'no_wavelengths'), volume)
    m = scopefs.mount(opts={'dxy': '0.4', 'dz': '1.2', 'numit': '1'})
    with open(m.mnt / '.scopefs' / 'status', 'rb') as f:
        text = f.read()
    status = json.loads(text.decode('utf-8'))  # strict: fails on a raw 0xE9
    stacks = {s['name']: s for s in status['stacks']}
    assert set(stacks) == {'Ex_561_Em_600_lat\ufffd', 'no_wavelengths'}, stacks
    served = os.listdir(os.fsencode(str(m.mnt / 'deconvolved')))
    assert served == [b'Ex_561_Em_600_lat\xe9'], served
    assert stacks['Ex_561_Em_600_lat\ufffd']['state'] == 'served'
    state = stacks['no_wavelengths']['state']
    assert state.startswith('not served: ') and 'lambda_ex' in state, state
    problems = [p for p in status['problems'] if p['path'].endswith('no_wavelengths')]
    assert problems and problems[0]['reason'] in state
    # the served stack reads back through its undecodable name
    plane = os.path.join(os.fsencode(str(m.mnt / 'deconvolved')), served[0], b'img_000001.tif')
    with open(plane, 'rb') as f:
        got = tifffile.imread(io.BytesIO(f.read()))
    assert got.shape == (16, 16) and got.dtype == np.uint16


def test_latin1_slide_name_gives_valid_ome_xml_and_status(scopefs):
    """A slide whose file name is Latin-1: its registered/ OME-TIFF carries
    the name in OME-XML declared UTF-8, which must still parse."""
    from xml.dom import minidom

    slide = scopefs.raw / 'tmp.ome.tif'
    gen.write_ome(slide, gen.pyramid(gen.tissue(300, 400, channels=1, seed=2)[..., None], 1),
                  tile=256)
    name = os.path.join(os.fsencode(str(scopefs.raw)), b'caf\xe9.ome.tif')
    os.rename(slide, name)
    m = scopefs.mount()
    status = json.loads((m.mnt / '.scopefs' / 'status').read_bytes().decode('utf-8'))
    assert [s['name'] for s in status['slides']] == ['caf\ufffd'], status['slides']
    virtual = os.path.join(os.fsencode(str(m.mnt / 'registered')), b'caf\xe9.ome.tif')
    with open(virtual, 'rb') as f:
        tif = tifffile.TiffFile(io.BytesIO(f.read()))
    xml = tif.pages[0].tags['ImageDescription'].value
    doc = minidom.parseString(xml.encode('utf-8') if isinstance(xml, str) else xml)
    image = doc.getElementsByTagName('Image')[0]
    assert image.getAttribute('Name') == 'caf\ufffd', image.getAttribute('Name')
    assert tif.pages[0].shape == (300, 400)


OME_NS = '{http://www.openmicroscopy.org/Schemas/OME/2016-06}'


def test_ome_xml_characters_beyond_the_basic_plane(scopefs):
    """XML allows character references up to U+10FFFF (a channel named
    'A &#128512; B' kept its emoji only below U+FFFF), and forbids U+FFFF
    itself (valid UTF-8, so a file name holding it went into the OME-XML
    as is, and expat refused the whole document)."""
    import xml.etree.ElementTree as ET

    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/'
           'Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" '
           'DimensionOrder="XYCZT" Type="uint16" SizeX="64" SizeY="64" SizeC="1" SizeZ="1" '
           'SizeT="1"><Channel ID="Channel:0:0" SamplesPerPixel="1" Name="A &#128512; B"/>'
           '<TiffData IFD="0" PlaneCount="1"/></Pixels></Image></OME>')
    tifffile.imwrite(scopefs.raw / 'c.ome.tif', np.zeros((64, 64), np.uint16), metadata=None,
                     description=xml)
    m = scopefs.mount()
    with tifffile.TiffFile(m.mnt / 'registered' / 'c.ome.tif') as t:
        names = [c.get('Name') for c in ET.fromstring(t.pages[0].description.encode())
                 .iter(OME_NS + 'Channel')]
    assert names == ['A \U0001F600 B'], names
    # a second dataset: a slide alone, named with U+FFFF
    raw2 = scopefs.tmp / 'raw2'
    raw2.mkdir()
    with open(os.path.join(os.fsencode(str(raw2)), b'slide\xef\xbf\xbf.ome.tif'), 'wb') as f:
        data = io.BytesIO()
        tifffile.imwrite(data, np.zeros((64, 64), np.uint16), metadata=None)
        f.write(data.getvalue())
    m = scopefs.mount(raw=raw2)
    served = os.path.join(os.fsencode(str(m.mnt / 'registered')), b'slide\xef\xbf\xbf.ome.tif')
    with open(served, 'rb') as f:
        with tifffile.TiffFile(io.BytesIO(f.read())) as t:
            root = ET.fromstring(t.pages[0].description.encode('utf-8'))
    assert root.find(OME_NS + 'Image').get('Name') == 'slide\ufffd'


def test_default_threads_follow_the_cpu_affinity(scopefs):
    """threads= defaults to one per CPU this process may use (its affinity
    mask, what `nproc` prints: SLURM's --cpus-per-task, taskset, cpusets),
    not every CPU of the node, which oversubscribed shared nodes."""
    gen.write_ome(scopefs.raw / 's.ome.tif', [gen.norm(gen.tissue(256, 256, 1, seed=1))], ['A'],
                  0.5)
    saved = os.sched_getaffinity(0)
    cpu = min(saved)
    os.sched_setaffinity(0, {cpu})  # the daemon inherits it
    try:
        m = scopefs.mount(opts={'reg': 'off'})
    finally:
        os.sched_setaffinity(0, saved)
    assert m.status()['threads'] == 1, m.status()['threads']
