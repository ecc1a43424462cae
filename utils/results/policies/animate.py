"""The shipped policies moving, in one animated GIF: a column per task, a row per algorithm (README.md beside this file).

    MUJOCO_GL=egl python -m utils.results.policies.animate [--policies utils/results/policies] [--out .../policies.gif]

Each panel plays its policy as `utils.evaluate --seed 0` does (the mean action; the episode reset with seed 0, then 1, ...
if it ends), filmed by the task's tracking camera, one frame every `--seconds` of simulated time, on a floor of squares 4
times larger than the task's own (the GIF a fifth smaller); the frames share one palette of `--colors` colours. The GIF
plays them `--speed` times faster than real time.
"""

import os
from dataclasses import dataclass

import mujoco
import numpy as np
import tyro
from PIL import Image, ImageDraw, ImageFont

from utils.evaluate import make_policy
from utils.logs import one_line_errors

TASKS = ("Ant-v5", "HalfCheetah-v5", "Hopper-v5", "Humanoid-v5", "HumanoidStandup-v5", "Walker2d-v5")
ALGOS = {"trefree": "TREFree", "ppo": "PPO", "trpo": "TRPO"}


@dataclass
class Args:
    policies: str = "utils/results/policies"
    """the folder of the policies, <policies>/<task>/<algo>.pt"""
    out: str = "utils/results/policies/policies.gif"
    """the animated GIF"""
    frames: int = 60
    """frames per panel"""
    seconds: float = 0.08
    """simulated seconds between two frames"""
    speed: float = 1.6
    """how many times faster than real time the GIF plays"""
    panel: int = 112
    """the side of a panel, in pixels"""
    colors: int = 24
    """the palette's size"""


def film(path: str, frames: int, seconds: float, side: int) -> list[Image.Image]:
    """`frames` frames of the policy at `path`, one every `seconds` of simulated time, as `side` x `side` images."""
    env, act = make_policy(path, render=True)
    model = env.unwrapped.model
    if (floor := mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_MATERIAL, "MatPlane")) >= 0:  # the floor of the six tasks
        model.mat_texrepeat[floor] /= 4
    every, episode, images = max(1, round(seconds / env.unwrapped.dt)), 0, []
    obs, _ = env.reset(seed=0)
    for step in range(frames * every):
        if step % every == 0:
            images.append(Image.fromarray(env.render()).resize((side, side), Image.Resampling.LANCZOS))
        obs, _, terminated, truncated, _ = env.step(act(obs))
        if terminated or truncated:  # the next evaluation episode
            episode += 1
            obs, _ = env.reset(seed=episode)
    env.close()
    return images


def main(args: Args) -> None:
    paths = {(task, algo): os.path.join(args.policies, task, f"{algo}.pt") for algo in ALGOS for task in TASKS}
    if missing := [path for path in paths.values() if not os.path.isfile(path)]:
        raise SystemExit(f"error: no policy at {missing[0]} (utils.results.policies.ship writes them)")
    panels = {key: film(path, args.frames, args.seconds, args.panel) for key, path in paths.items()}
    font, top, left = ImageFont.load_default(size=11), 16, 56  # the labels' strips
    background = Image.new("RGB", (left + args.panel * len(TASKS), top + args.panel * len(ALGOS)), "#202020")
    draw = ImageDraw.Draw(background)
    for i, task in enumerate(TASKS):
        draw.text((left + (i + 0.5) * args.panel, top / 2), task, font=font, fill="white", anchor="mm")
    for j, name in enumerate(ALGOS.values()):
        draw.text((left / 2, top + (j + 0.5) * args.panel), name, font=font, fill="white", anchor="mm")
    grid = []
    for i in range(args.frames):
        frame = background.copy()
        for (task, algo), images in panels.items():
            frame.paste(images[i], (left + TASKS.index(task) * args.panel, top + list(ALGOS).index(algo) * args.panel))
        grid.append(frame)
    sample = Image.fromarray(np.concatenate([np.asarray(frame) for frame in grid[:: max(1, args.frames // 10)]]))
    palette = sample.quantize(args.colors, method=Image.Quantize.FASTOCTREE)  # keeps the bodies' orange
    images = [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in grid]
    duration = round(1000 * args.seconds / args.speed)  # milliseconds per frame
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    images[0].save(args.out, save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=True)
    print(f"wrote {args.out}: {len(images)} frames of {grid[0].width} x {grid[0].height}, {os.path.getsize(args.out):,} bytes")


if __name__ == "__main__":
    with one_line_errors():
        main(tyro.cli(Args))
